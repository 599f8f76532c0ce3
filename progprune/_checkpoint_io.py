"""Reading a checkpoint file without running code in it: a safetensors file, or a torch
pickle through `torch.load(weights_only=True)` with the code a refused pickle would import
named (pickletools reads its opcodes, nothing is executed); an artifact's fields typed and
bounded before anything is allocated from them; the usual training-script wrappers and key
prefixes taken off a plain state_dict. `progprune.artifacts` builds models from what this
reads."""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings

import torch

from progprune._files import not_a_regular_file
from progprune.errors import BadInput, one_line, show

WRAPPER_KEYS = ("state_dict", "model", "model_ema")  # checked in this order
_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile


# ---- the file --------------------------------------------------------------------
def is_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:  # 8-byte little-endian header length, then a JSON object
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def _read_safetensors(path: str) -> dict:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise BadInput(f"checkpoint {path} is a .safetensors file: reading it needs the "
                             "safetensors package (pip install safetensors)") from None
    try:
        return dict(load_file(path, device="cpu"))
    except (SafetensorError, OSError) as e:  # every header or data fault is a SafetensorError
        raise BadInput(f"checkpoint {path} is a corrupt safetensors file: {one_line(e, limit=120)}") from None


_SCAN_LIMIT = 64 << 20  # bytes of a pickle scanned for the code it would import
_CODE_OPS = {"GLOBAL", "STACK_GLOBAL", "INST", "REDUCE", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"}


def _pickle_code(path: str) -> tuple[bool, list[str]]:
    """Read the file as a pickle without running it (pickletools walks the opcodes):
    (whether it is one complete pickle, the callables it would import: "posix.system").
    A pickle that builds objects but names no global reports "objects"."""
    import pickletools

    with open(path, "rb") as f:
        data = f.read(_SCAN_LIMIT)
    found, strings, memo, code, last = [], [], {}, False, None
    try:
        for op, arg, _ in pickletools.genops(data):
            pushed = None  # the string this opcode leaves on top of the stack, if any
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL":  # module and name: the last two strings pushed
                found.append(".".join(str(v) for v in strings[-2:]))
            elif isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                pushed = arg
            elif op.name == "MEMOIZE":  # memoizes the top of the stack under the next index
                memo[len(memo)] = last
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = last
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                pushed = memo.get(arg)
            if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                continue  # the top of the stack is unchanged
            if isinstance(pushed, str):
                strings.append(pushed)
            last = pushed
            code = code or op.name in _CODE_OPS
        complete = True
    except Exception:  # noqa: BLE001 - pickletools on arbitrary bytes: any fault means "not a whole pickle"
        complete = False
    if code and not found:
        found = ["objects"]
    return complete, list(dict.fromkeys(found))


def _describe_bytes(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK"):
        return "a damaged or truncated zip archive"
    complete, _ = _pickle_code(path)
    if complete:
        return "a pickle in a form the weights-only loader does not read; save it with torch.save"
    if head[:1] == b"\x80":
        return "a damaged or truncated pickle"
    return f"it starts with {head!r}, not a zip archive, pickle or safetensors header"


def _refuse_code(path: str, names: list[str]) -> BadInput:
    shown = ", ".join(names[:3]) + (f", +{len(names) - 3} more" if len(names) > 3 else "")
    what = ("it is a pickle of objects, not plain weights" if names == ["objects"] else
            f"it would import {shown} (a pickle that holds code")
    return BadInput(f"checkpoint {path} refused: {what}{')' if names != ['objects'] else ''}, which the "
                    "weights-only loader refuses; progprune loads only plain weights (weights_only=True)")


def read_checkpoint(path) -> dict:
    path = os.fspath(path)
    what = not_a_regular_file(path)
    if what == "not found":
        raise BadInput(f"checkpoint not found: {path}")
    if what:
        raise BadInput(f"checkpoint {path} is {what}; give the checkpoint file")
    if is_safetensors(path):
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():  # odd protocol bytes in garbage files warn loudly
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"GLOBAL (\S+)", str(e))
        if blocked:  # a pickle that would import code: name what it wanted
            raise _refuse_code(path, [blocked.group(1)]) from None
        complete, code = _pickle_code(path)
        if complete and code:  # a raw pickle torch stops at an opcode, before its globals
            raise _refuse_code(path, code) from None
        if complete:
            raise BadInput(f"checkpoint {path} is a pickle in a form the weights-only loader does not "
                           "read (not a torch.save file); save the weights with torch.save") from None
        raise BadInput(f"checkpoint {path} is corrupt or not a torch file ({_describe_bytes(path)})") from None
    # broad on purpose: torch's unpickler on bytes of unknown origin raises many types
    # (KeyError '101' for text, RuntimeError, EOFError, ...); each means "not a torch file"
    except Exception:
        raise BadInput(f"checkpoint {path} is corrupt or not a torch file ({_describe_bytes(path)})") from None
    if not isinstance(obj, dict):
        raise BadInput(f"checkpoint {path}: expected a dict of weights, got {type(obj).__name__}")
    return obj


def _schema_range(field: str) -> tuple[int, int]:
    """[lo, hi] of an integer field of the data set schema (progprune.config), so that what
    a file may claim is bounded as a spec is."""
    import typing

    import annotated_types as at

    from progprune.config import DatasetConfig

    lo = hi = None
    todo = [DatasetConfig.model_fields[field].annotation]
    while todo:
        t = todo.pop()
        for m in getattr(t, "__metadata__", ()):
            for c in (m, *getattr(m, "metadata", ())):
                lo = c.ge if isinstance(c, at.Ge) else lo
                hi = c.le if isinstance(c, at.Le) else hi
        todo += [a for a in typing.get_args(t) if a is not type(None)]
    return lo, hi


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_artifact(obj: dict, path: str) -> None:
    """Every field of an artifact, typed and bounded, before anything is built from it (a
    file claiming 10^10 pixels or classes would otherwise be allocated): one line naming
    the first field that is wrong."""
    lo_c, hi_c = _schema_range("num_classes")
    lo_s, hi_s = _schema_range("image_size")
    max_pixels = 3 * hi_s * hi_s  # the largest input a spec can ask for: RGB at the largest image_size

    def bad(field: str, want: str, got) -> BadInput:
        return BadInput(f"checkpoint {path}: {field} must be {want}, got {show(got)}; the file is "
                        "damaged or was not written by progprune")

    name, nc, shape = obj.get("model"), obj.get("num_classes"), obj.get("input_shape")
    if not isinstance(name, str) or not name.strip() or len(name) > 4096:
        raise bad("model", "a model name", name)
    if not _int(nc) or not lo_c <= nc <= hi_c:
        raise bad("num_classes", f"an integer in [{lo_c}, {hi_c}]", nc)
    if shape is not None:
        ok = (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(_int(v) and v >= 1 for v in shape)
              and shape[1] <= hi_s and shape[2] <= hi_s and shape[0] * shape[1] * shape[2] <= max_pixels)
        if not ok:
            raise bad("input_shape", f"[C, H, W] with H and W in [{lo_s}, {hi_s}] (dataset.image_size) "
                      f"and C*H*W at most 3x{hi_s}x{hi_s}", shape)
    history = obj.get("pruning_history")

    def step_ok(h) -> bool:
        return (isinstance(h, (list, tuple)) and len(h) == 3 and isinstance(h[0], str) and isinstance(h[1], bool)
                and isinstance(h[2], (list, tuple)) and all(_int(i) and i >= 0 for i in h[2]))

    if history is not None:
        if not isinstance(history, list):
            raise bad("pruning_history", "a list", history)
        wrong = next((i for i, h in enumerate(history) if not step_ok(h)), None)
        if wrong is not None:
            raise bad(f"pruning_history[{wrong}]", "[layer name, is_out, [channel index, ...]]", history[wrong])
    if not _is_tensor_dict(obj.get("state_dict")):
        raise bad("state_dict", "a dict of tensors", type(obj.get("state_dict")).__name__)
    if obj.get("meta") is not None and not isinstance(obj["meta"], dict):
        raise bad("meta", "a dict", type(obj["meta"]).__name__)


def _is_tensor_dict(d) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in d.items())


def unwrap(obj: dict, path: str) -> tuple[dict, str | None, str]:
    """(state_dict, wrapper key or None, stripped key prefix) of a non-artifact checkpoint."""
    key = None
    if not _is_tensor_dict(obj):
        for k in WRAPPER_KEYS:
            inner = obj.get(k)
            if isinstance(inner, dict) and _is_tensor_dict(inner.get("state_dict")):
                inner, k = inner["state_dict"], f"{k}.state_dict"
            if _is_tensor_dict(inner):
                obj, key = inner, k
                break
        else:
            found = ", ".join(sorted(map(str, obj))[:6]) or "nothing"
            raise BadInput(
                f"checkpoint {path}: neither a progprune artifact nor a state_dict of tensors "
                f"(top-level keys: {found}; expected tensors or one of {', '.join(WRAPPER_KEYS)})")
    prefix = ""
    while True:
        p = next((p for p in _PREFIXES if all(k.startswith(p) for k in obj)), None)
        if p is None:
            break
        obj = {k[len(p):]: v for k, v in obj.items()}
        prefix += p
    return obj, key, prefix


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_finite(sd: dict, path: str) -> None:
    bad = [(k, v) for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        k, v = bad[0]
        n = int((~torch.isfinite(v)).sum())
        more = f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
        raise BadInput(f"checkpoint {path} holds non-finite weights ({k}: {n} of {v.numel()} are nan/inf"
                       f"{more}); nothing can be ranked or pruned from them: use a checkpoint whose "
                       "training did not diverge")
