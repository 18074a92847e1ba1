"""IJB-B / IJB-C: the protocol equals a naive NumPy transcription of insightface's procedure (eval_ijbc.py for
1:1, ijb_1n.py for 1:N) on a release written in the release's own text formats; the reader refuses broken
releases with one sentence each."""

import heapq
import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_curve
from sklearn.preprocessing import normalize

from doppel.data.align import ARCFACE_POINTS, align_face
from doppel.data.dataset import CorruptImage, DataError
from doppel.data.readers.ijb import read_ijb
from doppel.evaluation import ijb
from doppel.evaluation.protocol import DataFacts, Embedded, Inputs
from tests.data.ijb_files import write_release

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


# -- the transcription (loops and library calls as insightface's scripts make them) ------------------------
def _input_features(plain, flipped, faceness, flip, norm_score, detector_score):
    feats = plain + flipped if flip else plain
    if not norm_score:
        feats = feats / np.sqrt(np.sum(feats ** 2, -1, keepdims=True))
    if detector_score:
        feats = feats * faceness[:, np.newaxis]
    return feats


def _template_features(feats, templates, medias, chosen):
    unique_templates = np.unique(chosen)
    template_feats = np.zeros((len(unique_templates), feats.shape[1]))
    for count, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_feats, face_medias = feats[ind_t], medias[ind_t]
        unique_medias, unique_media_counts = np.unique(face_medias, return_counts=True)
        media_feats = []
        for u, ct in zip(unique_medias, unique_media_counts):
            (ind_m,) = np.where(face_medias == u)
            media_feats += [face_feats[ind_m]] if ct == 1 else [np.mean(face_feats[ind_m], axis=0, keepdims=True)]
        template_feats[count] = np.sum(np.array(media_feats), axis=0)
    return normalize(template_feats), unique_templates


def transcribed_11(feats, templates, medias, pairs):
    template_norm_feats, unique_templates = _template_features(feats, templates, medias, templates)
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for count, uqt in enumerate(unique_templates):
        template2id[uqt] = count
    p1, p2, label = pairs[:, 0], pairs[:, 1], pairs[:, 2]
    score = np.sum(template_norm_feats[template2id[p1]] * template_norm_feats[template2id[p2]], -1).flatten()
    fpr, tpr, _ = roc_curve(label, score)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    tars = {}
    for x in FARS:
        _, min_index = min(list(zip(abs(fpr - x), range(len(fpr)))))
        tars[x] = tpr[min_index]
    return score, tars


def transcribed_1n(feats, templates, medias, gallery, probes):
    """gallery / probes: (templates, subjects) per CSV row."""
    def template_subjects(rows):
        chosen, ids = rows
        _, indices = np.unique(chosen, return_index=True)
        features, _ = _template_features(feats, templates, medias, chosen)
        return features, ids[indices]

    gallery_feats, gallery_ids = template_subjects(gallery)
    query_feats, query_ids = template_subjects(probes)
    mask = []
    for query_id in query_ids:
        pos = [i for i, x in enumerate(gallery_ids) if query_id == x]
        assert len(pos) == 1
        mask.append(pos[0])
    query_num, gallery_num = query_feats.shape[0], gallery_feats.shape[0]
    similarity = np.dot(query_feats, gallery_feats.T)
    top_inds = np.argsort(-similarity)
    found = {}
    for k in (1, 5, 10):
        found[f"rank{k}"] = sum(mask[i] in top_inds[i, 0:k] for i in range(query_num)) / query_num
    required_topk = [math.ceil(query_num * x) for x in (0.01, 0.1)]
    top_sims = similarity.copy()
    pos_sims = []
    for i in range(query_num):
        pos_sims.append(top_sims[i, mask[i]])
        top_sims[i, mask[i]] = -2.0
    pos_sims = np.array(pos_sims)
    neg_sims = heapq.nlargest(max(required_topk), top_sims[np.where(top_sims > -2.0)])
    assert len(neg_sims) and gallery_num > 1
    for far, pos in zip((0.01, 0.1), required_topk):
        found[f"tpir@fpir={far:g}"] = np.sum(pos_sims > neg_sims[pos - 1]) / query_num
    return found


def open_set(feats, templates, medias, halves, probes, fpirs=(0.01, 0.1)):
    """NIST's open-set TPIR, looped from its definition: each gallery alone; its non-mated searches' best
    scores set the threshold (at most FPIR x their number above it); a mated search counts when its best
    candidate is the mate and scores above it; the mean over the galleries."""
    probe_feats, _ = _template_features(feats, templates, medias, probes[0])
    probe_ids = probes[1][np.unique(probes[0], return_index=True)[1]]
    found = {f: [] for f in fpirs}
    for half in halves:
        gallery_feats, _ = _template_features(feats, templates, medias, half[0])
        gallery_ids = half[1][np.unique(half[0], return_index=True)[1]]
        hits, non_mated = [], []
        for i in range(len(probe_ids)):
            scores = [float(np.dot(probe_feats[i], gallery_feats[j])) for j in range(len(gallery_ids))]
            best = max(range(len(scores)), key=lambda j: scores[j])
            if probe_ids[i] in gallery_ids:
                hits.append((gallery_ids[best] == probe_ids[i], scores[best]))
            else:
                non_mated.append(scores[best])
        for f in fpirs:
            ordered = sorted(non_mated, reverse=True)
            allowed = int(f * len(ordered) + 1e-9)
            threshold = ordered[allowed] if allowed < len(ordered) else -math.inf
            found[f].append(sum(hit and score > threshold for hit, score in hits) / len(hits))
    return {f"open_tpir@fpir={f:g}": float(np.mean(v)) for f, v in found.items()}


def _csv_rows(path):
    rows = np.loadtxt(path, dtype=str, skiprows=1, delimiter=",")
    return rows[:, 0].astype(int), rows[:, 1].astype(int)


# -- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("ijb"), subjects=8, templates_per_subject=4, image_size=(24, 20))


def _features(written, dim=12, seed=1):
    """Face embeddings near their subject's direction, their mirrors near them; float32 as a network gives."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (200, dim))
    subjects = np.array([written.subjects[int(t)] for t in written.templates]) - 100
    plain = centres[subjects] * 0.6 + rng.normal(0, 1, (len(subjects), dim)) * rng.uniform(0.5, 3, (len(subjects), 1))
    flipped = plain + rng.normal(0, 0.4, plain.shape)
    return torch.from_numpy(plain.astype(np.float32)), torch.from_numpy(flipped.astype(np.float32))


SWITCHES = [(True, True, True), (True, False, False), (False, True, False), (True, False, True)]


@pytest.mark.parametrize("flip,norm_score,detector_score", SWITCHES)
def test_the_1to1_and_1toN_metrics_equal_insightfaces_procedure(release, flip, norm_score, detector_score):
    data = read_ijb(release.folder.parent, "IJBC")
    plain, flipped = _features(release)
    feats = _input_features(plain.numpy().astype(np.float64), flipped.numpy().astype(np.float64),
                            data.detector_scores.astype(np.float64), flip, norm_score, detector_score)
    expected_scores, expected_tars = transcribed_11(feats, release.templates, release.medias, release.pairs)
    protocol = ijb.IJBProtocol(root=str(release.folder.parent), flip=flip, norm_score=norm_score,
                               detector_score=detector_score)
    protocol.bind(None)
    result = protocol.evaluate(Inputs(split=None, pairs={"ijbc": Embedded(plain, flipped if flip else None)}))
    for far in FARS:
        assert result.metrics[f"ijbc/tar@far={far:g}"] == expected_tars[far], far
    meta = release.folder / "meta"
    expected_1n = transcribed_1n(feats, release.templates, release.medias,
                                 tuple(np.concatenate(p) for p in zip(_csv_rows(meta / "ijbc_1N_gallery_G1.csv"),
                                                                      _csv_rows(meta / "ijbc_1N_gallery_G2.csv"))),
                                 _csv_rows(meta / "ijbc_1N_probe_mixed.csv"))
    halves = [_csv_rows(meta / "ijbc_1N_gallery_G1.csv"), _csv_rows(meta / "ijbc_1N_gallery_G2.csv")]
    expected_1n.update(open_set(feats, release.templates, release.medias, halves,
                                _csv_rows(meta / "ijbc_1N_probe_mixed.csv")))
    for name, value in expected_1n.items():
        assert result.metrics[f"ijbc/{name}"] == pytest.approx(value, abs=1e-12), name
    # the scores themselves, and the metrics are not trivially 0 or 1
    ids, features = ijb.template_features(Embedded(plain, flipped if flip else None), data.templates, data.medias,
                                          flip, norm_score, data.detector_scores if detector_score else None, chunk=7)
    np.testing.assert_allclose(ijb.pair_scores(features, ids, data.pairs, chunk=5), expected_scores, atol=1e-12)
    assert 0 < result.metrics["ijbc/tar@far=0.01"] < 1 and 0 < expected_1n["rank1"] < 1
    assert 0 < expected_1n["open_tpir@fpir=0.1"] < 1
    assert set(result.metrics) == set(protocol.metric_names())


def test_the_roc_is_scikit_learns_with_ties_and_straight_runs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        genuine = rng.random(300) < 0.3
        scores = np.round(rng.normal(genuine * 1.0, 1.0), 1)  # many ties, long collinear runs
        far, tar = ijb.roc(scores, genuine)
        expected_far, expected_tar, _ = roc_curve(genuine, scores)
        np.testing.assert_array_equal(far, expected_far)
        np.testing.assert_array_equal(tar, expected_tar)


def test_tar_at_far_takes_the_nearest_point_and_of_equals_the_largest_tar():
    far = np.array([0.0, 0.0, 0.1, 0.1, 0.3, 1.0])
    tar = np.array([0.0, 0.4, 0.5, 0.7, 0.9, 1.0])
    assert ijb.tar_at_far(far, tar, 1e-6) == 0.4  # FAR 0: the vertical run's top
    assert ijb.tar_at_far(far, tar, 0.12) == 0.7
    assert ijb.tar_at_far(far, tar, 0.25) == 0.9


def test_the_chunks_do_not_change_the_identification(release):
    data = read_ijb(release.folder.parent, "IJBC")
    plain, flipped = _features(release, seed=3)
    ids, features = ijb.template_features(Embedded(plain, flipped), data.templates, data.medias)
    args = (features, ids, data.gallery.templates, data.gallery.subjects, data.probes.templates, data.probes.subjects)
    assert ijb.identification(*args, chunk=3) == ijb.identification(*args)


def test_a_face_is_aligned_from_its_landmarks_as_written(tmp_path):
    """Landmarks on arcface's points of a 112 crop: the aligned face is the image itself (x before y)."""
    written = write_release(tmp_path, subjects=2, templates_per_subject=2, image_size=(112, 112))
    path = written.folder / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    lines[0] = "1.jpg " + " ".join(f"{v:.4f}" for v in ARCFACE_POINTS.reshape(-1)) + " 0.9"
    path.write_text("\n".join(lines) + "\n")
    pixels = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(written.folder / "loose_crop" / "1.jpg", format="PNG")  # content decides
    faces = read_ijb(tmp_path, "IJBC").faces
    assert torch.equal(faces[0], torch.from_numpy(pixels).permute(2, 0, 1))
    second = np.array(Image.open(written.folder / "loose_crop" / "2.jpg").convert("RGB"))
    np.testing.assert_array_equal(faces[1].permute(1, 2, 0).numpy(),
                                  align_face(second, np.round(written.landmarks[1], 3).astype(np.float32), 112))


# -- refused releases ----------------------------------------------------------------------------------------
def _broken(tmp_path, edit):
    written = write_release(tmp_path, subjects=3, templates_per_subject=2, image_size=(24, 20))
    edit(written.folder / "meta")
    return written


def _replace_line(path, number, text):
    lines = path.read_text().splitlines()
    lines[number] = text
    path.write_text("\n".join(lines) + "\n")


def test_a_missing_meta_file_is_named(tmp_path):
    _broken(tmp_path, lambda meta: (meta / "ijbc_face_tid_mid.txt").unlink())
    with pytest.raises(FileNotFoundError, match=r"ijbc_face_tid_mid.txt is missing: an IJB release has"):
        read_ijb(tmp_path, "IJBC")
    with pytest.raises(FileNotFoundError, match=r"holds neither IJBB/meta nor meta/"):
        read_ijb(tmp_path, "IJBB")


def test_a_pair_naming_a_template_without_faces_is_refused(tmp_path):
    _broken(tmp_path, lambda meta: _replace_line(meta / "ijbc_template_pair_label.txt", 2, "1 999 0"))
    with pytest.raises(DataError, match=r"ijbc_template_pair_label.txt, line 3: template 999 has no face in "
                                        r"ijbc_face_tid_mid.txt"):
        read_ijb(tmp_path, "IJBC")


def test_a_landmark_row_with_a_wrong_count_is_refused(tmp_path):
    def drop_value(meta):
        path = meta / "ijbc_name_5pts_score.txt"
        _replace_line(path, 4, " ".join(path.read_text().splitlines()[4].split()[:-2]))

    _broken(tmp_path, drop_value)
    with pytest.raises(DataError, match=r"ijbc_name_5pts_score.txt, line 5: 10 fields where 12 are expected"):
        read_ijb(tmp_path, "IJBC")


def test_meta_files_of_different_orders_are_refused(tmp_path):
    def swap(meta):
        path = meta / "ijbc_face_tid_mid.txt"
        lines = path.read_text().splitlines()
        lines[0], lines[1] = lines[1], lines[0]
        path.write_text("\n".join(lines) + "\n")

    _broken(tmp_path, swap)
    with pytest.raises(DataError, match=r"must list the same images in the same order .*first differ at entry 1"):
        read_ijb(tmp_path, "IJBC")


def test_a_probe_without_a_gallery_mate_and_a_bad_label_are_refused(tmp_path):
    written = _broken(tmp_path, lambda meta: None)
    gallery = written.folder / "meta" / "ijbc_1N_gallery_G2.csv"
    gallery.write_text(gallery.read_text().splitlines()[0] + "\n" + "\n".join(
        line for line in gallery.read_text().splitlines()[1:] if not line.split(",")[1] == "102") + "\n")
    with pytest.raises(DataError, match=r"subject 102 .* has no template in the galleries"):
        read_ijb(tmp_path, "IJBC")
    assert read_ijb(tmp_path, "IJBC", identification=False).gallery is None
    _replace_line(written.folder / "meta" / "ijbc_template_pair_label.txt", 0, "1 2 7")
    with pytest.raises(DataError, match=r"line 1: the label 7 is neither 1"):
        read_ijb(tmp_path, "IJBC", identification=False)


def test_an_image_that_cannot_be_decoded_is_named(tmp_path):
    written = _broken(tmp_path, lambda meta: None)
    (written.folder / "loose_crop" / "3.jpg").write_bytes(b"\xff\xd8\xff broken")
    faces = read_ijb(tmp_path, "IJBC").faces
    with pytest.raises(CorruptImage, match=r"loose_crop/3.jpg is not a readable image \(.*\): restore it from"):
        faces[2]


def test_the_protocol_needs_its_root():
    with pytest.raises(ValueError, match=r"eval.ijb.root is not set"):
        ijb.IJBProtocol().bind(DataFacts(parts=torch.zeros(1), references_given=False, benchmark=None, folder=None,
                                         locate=lambda p, k: p))


def test_ijbb_reads_its_s1_s2_galleries(tmp_path):
    written = write_release(tmp_path, target="IJBB", subjects=4, templates_per_subject=2, image_size=(24, 20))
    data = read_ijb(tmp_path, "IJBB")
    first = {}
    for template in sorted(written.subjects):
        first.setdefault(written.subjects[template], template)
    assert data.gallery.templates.tolist() == sorted(first.values())
    assert data.gallery.half.tolist() == [0, 0, 1, 1]  # S1 holds subjects 100-101, S2 102-103
    assert sorted(data.probes.templates.tolist()) == sorted(set(written.subjects) - set(first.values()))
    protocol = ijb.IJBProtocol(root=str(written.folder), target="IJBB")  # the target's folder itself
    protocol.bind(None)
    assert protocol.headline == "ijbb/tar@far=0.0001" and "ijbb/open_tpir@fpir=0.01" in protocol.metric_names()
