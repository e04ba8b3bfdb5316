"""The size rules of tests/test_structure.py for the C++ and CUDA sources (csrc/): no file over 400 lines, no
function over 60, read from the text (comments, strings and preprocessor lines left out; a function runs from the
first line of its declaration to its closing brace)."""
import os
import re

from tests.test_structure import MAX_FUNCTION_LINES, MAX_MODULE_LINES, ROOT

CSRC = os.path.join(ROOT, "csrc")
SOURCES = (".cpp", ".h", ".cu", ".cuh")
SCOPE = re.compile(r"(template\s*<[^{]*>\s*)?(namespace|struct|class|union|enum|extern)\b")
# comments, string and char literals (kept as blanks of the same line count), preprocessor lines with continuations
NOISE = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|^[ \t]*#(?:[^\n]*\\\n)*[^\n]*',
                   re.DOTALL | re.MULTILINE)


def without_noise(text: str) -> str:
    return NOISE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def functions(text: str) -> list:
    """(first line, line count) of every function body outside a function: a brace block whose declaration has a
    parameter list and is no namespace, struct, class, union, enum or extern block."""
    code = without_noise(text)
    found, stack, begin = [], [], 0  # stack: "scope", or ("function", first line) for the outermost function
    for i, ch in enumerate(code):
        in_function = any(entry != "scope" for entry in stack)
        if ch == "{":
            declaration = code[begin:i].strip()
            if in_function:
                stack.append("block")
            elif ")" in declaration and not SCOPE.match(declaration):
                stack.append(("function", code.count("\n", 0, i - len(code[begin:i].lstrip())) + 1))
            else:
                stack.append("scope")
        elif ch == "}" and stack:
            entry = stack.pop()
            if isinstance(entry, tuple):
                found.append((entry[1], code.count("\n", 0, i) + 2 - entry[1]))
        if ch in ";{}" and not any(entry != "scope" for entry in stack):
            begin = i + 1
    return found


def test_the_scan_measures_functions():
    text = ("namespace a {\n// x() {\nstruct S {\n  int f(int x) const {\n    if (x) {\n      return 1;\n    }\n"
            "    return 2;\n  }\n};\ntemplate <typename T>\nT g(T y) { return y; }\n}  // namespace a\n")
    assert functions(text) == [(4, 6), (11, 2)]
    assert functions('#define M(x) \\\n  { x; }\nvoid h() {\n  const char* s = "{";\n}\n') == [(3, 3)]


def test_csrc_files_and_functions_are_small():
    too_long = []
    for folder, _, files in os.walk(CSRC):
        for name in sorted(files):
            if not name.endswith(SOURCES):
                continue
            path = os.path.join(folder, name)
            text = open(path).read()
            where = os.path.relpath(path, ROOT)
            if text.count("\n") > MAX_MODULE_LINES:
                too_long.append(f"{where}: {text.count(chr(10))} lines")
            too_long += [f"{where}:{first}: a function of {length} lines" for first, length in functions(text)
                         if length > MAX_FUNCTION_LINES]
    assert too_long == []
