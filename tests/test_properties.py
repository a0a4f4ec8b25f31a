"""Property tests: nothing an agent sends is ever interpreted by a shell.

Random file names and contents go through write → read → edit; random strings go through `run` as
an argv and as a quoted word, and must come back exactly.
"""

from __future__ import annotations

import shlex

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox import ReadResult, Sandbox

# Any text but NUL (no C string can carry it) and lone surrogates (not encodable).
TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")
# A name may also hold bytes that are not UTF-8, spelled as os.fsdecode does (U+DC80..U+DCFF).
ODD_BYTE = st.integers(0x80, 0xFF).map(lambda b: chr(0xDC00 + b))
NAMES = st.text(TEXT.filter(lambda c: c != "/") | ODD_BYTE, min_size=1, max_size=40).filter(
    lambda n: n not in (".", "..")
)
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPS
@given(name=NAMES, body=st.text(TEXT, max_size=300), marker=st.text(TEXT, min_size=1, max_size=20))
async def test_names_and_contents_round_trip(sb: Sandbox, name: str, body: str, marker: str) -> None:
    path = f"props/{name}"
    content = f"{body}\n<<{marker}>>\n"
    written = await sb.write(path, content)
    assert written.bytes == len(content.encode())
    assert await sb.read_text(path) == content
    read = await sb.read(path)
    assert isinstance(read, ReadResult)
    assert read.total_lines == len(content.split("\n")) - 1
    edited = await sb.edit(path, f"<<{marker}>>", "<<edited>>")
    assert edited.replacements == 1
    assert await sb.read_text(path) == f"{body}\n<<edited>>\n"
    assert (await sb.stat(path)).size == len(f"{body}\n<<edited>>\n".encode())
    await sb.remove(path)


@PROPS
@given(argument=st.text(TEXT, max_size=200))
async def test_run_echoes_any_argument_exactly(sb: Sandbox, argument: str) -> None:
    as_argv = await sb.run(["printf", "%s", argument])
    assert as_argv.stdout == argument and as_argv.exit_code == 0
    as_word = await sb.run(f"printf %s {shlex.quote(argument)}")
    assert as_word.stdout == argument
    with_env = await sb.run('printf %s "$ARG"', env={"ARG": argument})
    assert with_env.stdout == argument
