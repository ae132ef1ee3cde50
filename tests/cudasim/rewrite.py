"""The two source rewrites a .cu needs to compile as C++, and the kernels' C signatures.

Both rewrites keep every line where it is, so compiler messages, ``__LINE__``
(which barrier a deadlock names) and sanitizer reports point at the real
source:

* inline PTX ``asm("cvt.<...> %0, %1;" : "=r"(out) : "r"(in));`` becomes
  ``out = ::nksim::ptx_cvt_<...>(in);`` (no macro can stand in for ``asm``);
  any other ``asm`` is an error naming its line;
* ``__shared__ T name[dims];`` becomes ``NKSIM_SHARED(name, [dims], T);``,
  storage shared by a block's threads that starts as garbage in every block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PTX_CVT = re.compile(
    r'asm\s*\(\s*"(?P<op>cvt(?:\.\w+)+)\s+%0,\s*%1;"\s*:\s*"=\w"\((?P<out>[^()]+)\)\s*:\s*"\w"\((?P<arg>[^()]+)\)\s*\)\s*;'
)
_SHARED = re.compile(r"__shared__\s+(?P<type>[^;\[]+?)\s+(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]*\]\s*)*);")
_ASM = re.compile(r"\basm\b")


class RewriteError(ValueError):
    """The source uses something the harness cannot run (with its line)."""


def rewrite(source: str) -> str:
    """The source with its PTX conversions and ``__shared__`` declarations rewritten, line for line."""
    lines = source.split("\n")
    for number, line in enumerate(lines, 1):
        code = line.split("//", 1)[0]
        if "extern __shared__" in code:
            raise RewriteError(f"line {number}: dynamic shared memory is not supported: {line.strip()}")
        code = _PTX_CVT.sub(lambda m: f"{m['out']} = ::nksim::ptx_{m['op'].replace('.', '_')}({m['arg']});", code)
        if _ASM.search(code):
            raise RewriteError(f"line {number}: inline PTX other than a cvt conversion: {line.strip()}")
        code = _SHARED.sub(lambda m: f"NKSIM_SHARED({m['name']}, {m['dims'].strip()}, {m['type'].strip()});", code)
        if "__shared__" in code:
            raise RewriteError(
                f"line {number}: a __shared__ declaration the rewrite does not understand: {line.strip()}"
            )
        comment = line[len(line.split("//", 1)[0]) :]
        lines[number - 1] = code + comment
    return "\n".join(lines)


# --------------------------------------------------------------------------- signatures
@dataclass(frozen=True)
class Param:
    """One kernel parameter: a pointer to ``dtype`` (``const`` or not) or a scalar of ``dtype``."""

    name: str
    ctype: str
    dtype: str  # numpy dtype name (bfloat16 is its uint16 bit pattern, as on the device)
    pointer: bool
    const: bool


#: C element types -> the numpy dtype an argument must have (what CuPy would pass through untouched).
_DTYPES = {
    "nk_half": "float16",
    "nk_bfloat16": "uint16",
    "float": "float32",
    "double": "float64",
    "long long": "int64",
    "int": "int32",
    "unsigned short": "uint16",
    "unsigned int": "uint32",
    "unsigned long long": "uint64",
}
_KERNEL = re.compile(r'extern\s+"C"\s+__nksim_global__\s+void\s+(\w+)\s*\(([^)]*)\)')


def signatures(preprocessed: str) -> dict[str, tuple[Param, ...]]:
    """Every ``extern "C" __global__`` kernel in ``g++ -E`` output, with its parameters."""
    kernels = {}
    for match in _KERNEL.finditer(preprocessed):
        params = []
        for raw in filter(None, (p.strip() for p in match[2].split(","))):
            tokens = " ".join(raw.replace("*", " * ").split()).split(" ")
            name, words = tokens[-1], tokens[:-1]
            pointer = words.count("*")
            const = "const" in words
            base = " ".join(w for w in words if w not in ("const", "*", "__restrict"))
            if base not in _DTYPES or pointer > 1:
                raise RewriteError(f"kernel {match[1]}: parameter {raw!r} has a type the loader cannot pass")
            params.append(Param(name, " ".join(words), _DTYPES[base], bool(pointer), const))
        kernels[match[1]] = tuple(params)
    return kernels
