"""Reading the pickles datasets ship in (verification ``.bin`` packs, CIFAR batches) without running them.

``pickle.load`` executes whatever the file says (any global, any call): a downloaded dataset file must not.
Here the opcodes are parsed by :func:`pickletools.genops` (which only decodes them) and interpreted for
plain data only: lists, tuples, dicts, strings, bytes, numbers, booleans, None. With ``arrays=True``
exactly the globals NumPy uses to pickle an array (``_reconstruct``, ``ndarray``, ``dtype``) are recognised
by name, never imported or called: the array is rebuilt from its shape, dtype string and raw bytes. Any
other global, or any other opcode, is refused with its name and position.
"""

from __future__ import annotations

import pickletools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from doppel.data.dataset import DataError

_MARK = object()
_ARRAY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): "reconstruct",
                  ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
                  ("numpy", "ndarray"): "ndarray", ("numpy", "dtype"): "dtype"}
# How Python 3 writes bytes under protocol 2 (``_codecs.encode(text, "latin1")``): recognised, not called.
_BYTES_GLOBAL = ("_codecs", "encode")
_PLAIN = {"SHORT_BINSTRING", "BINSTRING", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "SHORT_BINUNICODE",
          "BINUNICODE", "BINUNICODE8", "UNICODE", "BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4",
          "BINFLOAT", "FLOAT"}
_IGNORED = {"PROTO", "FRAME"}


@dataclass
class _Global:
    name: str


@dataclass
class _DType:
    code: str
    order: str = "|"


@dataclass
class _Array:
    state: tuple = field(default_factory=tuple)

    def build(self, where: str) -> np.ndarray:
        try:
            _, shape, dtype, fortran, raw = self.state
            order = dtype.order if dtype.order in "<>" else "|"
            array = np.frombuffer(raw if isinstance(raw, bytes) else bytes(raw, "latin1"),
                                  np.dtype(order + dtype.code.lstrip("<>|=")))
            return array.reshape(shape, order="F" if fortran else "C").copy()
        except (ValueError, TypeError, AttributeError) as error:
            raise DataError(f"{where}: an array in the pickle is malformed ({error}).") from None


def safe_load(data: bytes, where: str, arrays: bool = False) -> Any:
    """The object a pickle of plain data describes; ``where`` names the file in errors."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}

    def refuse(why: str, position: int) -> DataError:
        return DataError(f"{where}: refused to load it: {why} at byte {position}. A dataset pickle holds only "
                         "data; this one would run code when unpickled, so it was not (nothing was executed).")

    def pop_mark() -> list[Any]:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1:]
                del stack[i:]
                return items
        raise DataError(f"{where}: a malformed pickle (no MARK).")

    try:
        for opcode, arg, position in pickletools.genops(data):
            name = opcode.name
            if name in _IGNORED:
                continue
            if name == "STOP":
                return _finish(stack.pop(), where)
            if name in ("SHORT_BINSTRING", "BINSTRING"):  # a Python 2 str: bytes
                stack.append(arg.encode("latin-1"))
            elif name in _PLAIN:
                stack.append(arg)
            elif name == "NONE":
                stack.append(None)
            elif name in ("NEWTRUE", "NEWFALSE"):
                stack.append(name == "NEWTRUE")
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "LIST":
                stack.append(pop_mark())
            elif name == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = tuple(stack[-n:])
                del stack[-n:]
                stack.append(items)
            elif name == "DICT":
                items = pop_mark()
                stack.append(dict(zip(items[::2], items[1::2])))
            elif name == "APPEND":
                value = stack.pop()
                stack[-1].append(value)
            elif name == "APPENDS":
                items = pop_mark()
                stack[-1].extend(items)
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                stack[-1][_key(key)] = value
            elif name == "SETITEMS":
                items = pop_mark()
                for key, value in zip(items[::2], items[1::2]):
                    stack[-1][_key(key)] = value
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                stack.append(memo[int(arg)])
            elif name in ("GLOBAL", "STACK_GLOBAL"):
                module, qualname = arg.split(" ", 1) if name == "GLOBAL" else (stack.pop(-2), stack.pop())
                kind = _ARRAY_GLOBALS.get((module, qualname)) if arrays else None
                if (module, qualname) == _BYTES_GLOBAL:
                    kind = "bytes"
                if kind is None:
                    raise refuse(f"it imports {module}.{qualname}", position)
                stack.append(_Global(kind))
            elif name == "REDUCE":
                args, function = stack.pop(), stack.pop()
                if not isinstance(function, _Global) or function.name == "ndarray":
                    raise refuse("it calls an object", position)
                if function.name == "bytes":
                    if not (len(args) == 2 and isinstance(args[0], str) and args[1] == "latin1"):
                        raise refuse("it calls _codecs.encode with other arguments than a latin1 string", position)
                    stack.append(args[0].encode("latin-1"))
                else:
                    stack.append(_Array() if function.name == "reconstruct" else _DType(str(args[0])))
            elif name == "BUILD":
                state = stack.pop()
                target = stack[-1]
                if isinstance(target, _Array):
                    target.state = tuple(state)
                elif isinstance(target, _DType):
                    target.order = str(state[1])
                else:
                    raise refuse("it sets the state of an object", position)
            else:
                raise refuse(f"opcode {name}", position)
    except DataError:
        raise  # a refusal or a malformed array says so itself
    except (ValueError, IndexError, KeyError, TypeError) as error:
        raise DataError(f"{where}: not a readable pickle ({error}); the file is damaged or not a pickle.") from None
    raise DataError(f"{where}: the pickle ends without STOP: the file is truncated.")


def _key(key: Any) -> Any:
    return key.decode("latin1") if isinstance(key, bytes) else key


def _finish(value: Any, where: str) -> Any:
    """The loaded value with each array stand-in rebuilt as an array."""
    if isinstance(value, _Array):
        return value.build(where)
    if isinstance(value, list):
        return [_finish(v, where) for v in value]
    if isinstance(value, tuple):
        return tuple(_finish(v, where) for v in value)
    if isinstance(value, dict):
        return {k: _finish(v, where) for k, v in value.items()}
    if isinstance(value, (_Global, _DType)):
        raise DataError(f"{where}: the pickle holds a bare {type(value).__name__}, not data.")
    return value
