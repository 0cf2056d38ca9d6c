#!/usr/bin/env python3
"""What can be checked of the Swift bindings on a machine without a Swift compiler.

1. Every generated and hand-written .swift file parses with tree-sitter-swift (PyPI 0.7.4)
   with zero ERROR or MISSING nodes. UniFFI wraps some declarations in
   `#if swift(>=5.8) / @_documentation(visibility: private) / #endif`, an `#if` around a lone
   attribute that the grammar cannot parse; those three-line blocks are blanked first (line
   numbers kept). The grammar also rejects the closure `{ () }` (a closure returning the
   empty tuple, which UniFFI emits for foreign-trait methods returning nothing); it is
   replaced by the equivalent `{ }`. A deliberately broken copy of each file must fail, so
   the check can fail.
2. The generated C header compiles with gcc, links against libferry_ffi.so and a call through
   it returns the UniFFI contract version the Swift code expects.
3. Every `uniffi_*`/`ffi_*` function the header declares is exported by the library.

Type errors cannot be caught without a Swift compiler; docs/bindings.md says so.

usage: swift-check.py GENERATED_DIR LIBRARY SWIFT_FILE...
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import tree_sitter
import tree_sitter_swift

DOC_BLOCK = re.compile(
    r"^[ \t]*#if swift\(>=5\.8\)\n[ \t]*@_documentation\(visibility: private\)\n[ \t]*#endif\n",
    re.M,
)


UNIT_CLOSURE = re.compile(r"\{ \(\) \}")


def parse_errors(text: str) -> list[str]:
    text = UNIT_CLOSURE.sub("{ }", DOC_BLOCK.sub("\n\n\n", text))
    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_swift.language()))
    tree = parser.parse(text.encode())
    errors: list[str] = []
    stack = [tree.root_node]
    while stack:
        n = stack.pop()
        if n.is_error or n.is_missing:
            kind = "missing " + n.type if n.is_missing else "unparsable"
            errors.append(f"line {n.start_point[0] + 1}: {kind}")
        if n.has_error:
            stack.extend(n.children)
    return errors


def check_parse(files: list[str]) -> int:
    bad = 0
    for f in files:
        text = open(f, encoding="utf-8").read()
        errs = parse_errors(text)
        if errs:
            bad += 1
            print(f"  FAIL {f}: {len(errs)} parse errors, first: {errs[:3]}")
            continue
        # The check must be able to fail: cut the file's last closing brace and a `)`.
        broken = text[: text.rstrip().rfind("}")] + "\nfunc broken( {\n"
        if not parse_errors(broken):
            bad += 1
            print(f"  FAIL {f}: a broken copy parsed cleanly (the check cannot fail)")
            continue
        print(f"  ok   {os.path.basename(f)} ({text.count(chr(10))} lines)")
    return bad


def check_header(gen: str, lib: str) -> int:
    header = os.path.join(gen, "FerryFFI.h")
    swift = open(os.path.join(gen, "Ferry.swift"), encoding="utf-8").read()
    m = re.search(r"let bindings_contract_version = (\d+)", swift)
    expected = m.group(1) if m else None
    src = """
#include <stdio.h>
#include "FerryFFI.h"
int main(void) {
    RustCallStatus status = {0};
    uint32_t v = ffi_ferry_ffi_uniffi_contract_version();
    RustBuffer s = uniffi_ferry_ffi_fn_func_ferry_version(&status);
    if (status.code != 0 || s.len == 0) { fprintf(stderr, "call failed\\n"); return 1; }
    printf("%u %.*s\\n", v, (int)s.len, (const char *)s.data);
    ffi_ferry_ffi_rustbuffer_free(s, &status);
    return status.code;
}
"""
    libdir = os.path.dirname(os.path.abspath(lib))
    with tempfile.TemporaryDirectory() as d:
        c = os.path.join(d, "check.c")
        exe = os.path.join(d, "check")
        open(c, "w").write(src)
        r = subprocess.run(
            ["gcc", "-Wall", "-Werror", "-D_Nullable=", "-D_Nonnull=", "-I", gen, c,
             "-L", libdir, "-lferry_ffi", "-o", exe],
            capture_output=True, text=True,
        )
        if r.returncode != 0:
            print("  FAIL header does not compile/link:\n" + r.stderr)
            return 1
        r = subprocess.run([exe], capture_output=True, text=True, env={**os.environ, "LD_LIBRARY_PATH": libdir})
        if r.returncode != 0:
            print("  FAIL calling through the header: " + r.stderr)
            return 1
        version, _, ferry = r.stdout.strip().partition(" ")
        if version != expected:
            print(f"  FAIL contract version {version}, the Swift code expects {expected}")
            return 1
        print(f"  ok   FerryFFI.h compiles with gcc, links, and calls in (contract {version}, ferry {ferry})")
    declared = set(re.findall(r"\b((?:uniffi|ffi)_\w+)\s*\(", open(header).read()))
    nm = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True, check=True)
    exported = {line.split()[-1] for line in nm.stdout.splitlines() if line.strip()}
    missing = sorted(declared - exported)
    if missing:
        print(f"  FAIL {len(missing)} declared symbols not exported: {missing[:5]}")
        return 1
    print(f"  ok   all {len(declared)} functions declared in FerryFFI.h are exported by {os.path.basename(lib)}")
    return 0


def main() -> int:
    gen, lib, *files = sys.argv[1:]
    bad = check_parse(files) + check_header(gen, lib)
    print(f"swift checks: {len(files)} files parsed, {'FAILED' if bad else 'all passed'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
