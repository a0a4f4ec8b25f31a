"""grep (ripgrep and the POSIX fallback) and glob."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandbox import ConnectionPool, Sandbox, search
from sandbox.errors import FileNotFound, InvalidArgument, PermissionDenied, SearchTimeout, SpecialFile
from sandbox.search import glob_to_regex
from tests.conftest import endpoint_for
from tests.sshd import SSHD

TREE = {
    "src/app.py": "import os\n\ndef main():\n    print('Hello')\n    return 0\n",
    "src/util.py": "def helper():\n    return 'hello world'\n",
    "src/web/index.ts": "export const hello = 1;\n",
    "README.md": "# Hello project\n",
    ".hidden/secret.txt": "hello from a hidden dir\n",
}


async def make_tree(box: Sandbox, name: str = "tree") -> str:
    root = f"{await box.home()}/{name}-{secrets.token_hex(4)}"
    for rel, text in TREE.items():
        await box.write(f"{root}/{rel}", text)
    # distinct mtimes, oldest first in TREE order, so "newest first" is checkable
    for age, rel in enumerate(reversed(list(TREE))):
        await box.run(["touch", "-d", f"@{1_700_000_000 - age * 100}", f"{root}/{rel}"])
    return root


@pytest.fixture
async def tree(sb: Sandbox) -> str:
    return await make_tree(sb)


@pytest.fixture
async def minimal_box(busybox_sshd: SSHD, client_key: Path, pool: ConnectionPool) -> AsyncIterator[Sandbox]:
    async with Sandbox(endpoint_for(busybox_sshd, client_key), pool=pool) as box:
        yield box


@pytest.fixture(params=["rg", "grep"])
def engine(request: pytest.FixtureRequest) -> str:
    """A test taking it runs twice: on a box with ripgrep, and on a busybox box with grep alone."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def box(engine: str, request: pytest.FixtureRequest) -> Sandbox:
    """The box for `engine`: `sb` (ripgrep) or `minimal_box` (busybox grep)."""
    return request.getfixturevalue("sb" if engine == "rg" else "minimal_box")  # type: ignore[no-any-return]


async def test_files_with_matches_is_newest_first(sb: Sandbox, tree: str) -> None:
    r = await sb.grep("hello", tree, case_insensitive=True)
    assert r.engine == "rg" and r.mode == "files_with_matches"
    assert r.text.splitlines() == [f"{tree}/{p}" for p in reversed(list(TREE))]
    # a small tree is searched with one thread from then on: the same answer
    assert sb._p.search._small_roots[tree] is True
    assert (await sb.grep("hello", tree, case_insensitive=True)).text == r.text


async def test_content_mode_uses_ripgreps_format_with_context(sb: Sandbox, tree: str) -> None:
    r = await sb.grep("print", f"{tree}/src", output_mode="content", before=1)
    assert r.text.splitlines() == [f"{tree}/src/app.py-3-def main():", f"{tree}/src/app.py:4:    print('Hello')"]
    assert r.lines == 2 and not r.truncated


async def test_count_mode(sb: Sandbox, tree: str) -> None:
    r = await sb.grep("return", tree, output_mode="count")
    assert r.text.splitlines() == [f"{tree}/src/app.py:1", f"{tree}/src/util.py:1"]


async def test_glob_and_type_filters(sb: Sandbox, tree: str) -> None:
    assert (await sb.grep("hello", tree, glob="*.ts")).text == f"{tree}/src/web/index.ts"
    assert (await sb.grep("hello", tree, type="ts", case_insensitive=True)).text == f"{tree}/src/web/index.ts"


# A grep `glob` means for both engines what it means to ripgrep run from the root: no '/', a name at
# any depth; a '/', a path under the root; '!' excludes; `**` any directories; `{a,b}` alternatives.
GREP_GLOBS = {
    "*.py": ["src/app.py", "src/util.py"],
    "*.{py,ts}": ["src/app.py", "src/util.py", "src/web/index.ts"],
    "**/*.py": ["src/app.py", "src/util.py"],
    "!*.py": ["src/web/index.ts", "README.md", ".hidden/secret.txt"],
    "src/*.py": ["src/app.py", "src/util.py"],
    "src/*": ["src/app.py", "src/util.py"],
    "src/**": ["src/app.py", "src/util.py", "src/web/index.ts"],
    "!src/**": ["README.md", ".hidden/secret.txt"],
    "src/**/*.ts": ["src/web/index.ts"],
    "/README.md": ["README.md"],
    "*/*.txt": [".hidden/secret.txt"],
    "{src/web,.hidden}/*": ["src/web/index.ts", ".hidden/secret.txt"],
    "!**/web/**": ["src/app.py", "src/util.py", "README.md", ".hidden/secret.txt"],
    "!web": ["src/app.py", "src/util.py", "README.md", ".hidden/secret.txt"],  # (a directory, not entered)
    "web/*.ts": [],  # (no web/ at the top)
    "src/": [],  # (directories only)
    # (without rg, these were once refused: find's -path lets '*' match '/')
    "**/web/*.ts": ["src/web/index.ts"],
    "s*/**/*.ts": ["src/web/index.ts"],
    "*/web/**": ["src/web/index.ts"],
    "!s*/w*/": ["src/app.py", "src/util.py", "README.md", ".hidden/secret.txt"],
    "*.{p[xy],t?}": ["src/app.py", "src/util.py", "src/web/index.ts"],
}


async def test_grep_globs_mean_what_they_mean_to_ripgrep_run_from_the_root(engine: str, box: Sandbox) -> None:
    """rg runs from "/" and would anchor a glob with a '/' there; find's -name takes no '/', `**`,
    `{a,b}` or '!'. A root with glob characters (and a space) in its name is no glob."""
    tree = await make_tree(box, "t [x]{a,b}*?\\!#")
    for glob, expected in GREP_GLOBS.items():
        found = await box.grep("hello", tree, glob=glob, case_insensitive=True)
        assert found.engine == engine
        assert sorted(found.text.splitlines()) == sorted(f"{tree}/{p}" for p in expected), glob
    content = await box.grep("print", tree, glob="src/*.py", output_mode="content")
    assert content.text == f"{tree}/src/app.py:4:    print('Hello')"
    # a file given as the path is searched whatever the glob says (as rg does)
    assert (await box.grep("print", f"{tree}/src/app.py", glob="*.ts")).text == f"{tree}/src/app.py"


async def test_a_glob_with_a_slash_under_a_symlinked_or_not_utf8_root(box: Sandbox) -> None:
    """(Why rg is not simply run from the root: it would compare paths with the root as getcwd
    spells it, the symlink's target. And rg reads a glob's bytes that are not UTF-8 as U+FFFD.)"""
    tree = await make_tree(box)
    await box.run(["ln", "-s", tree, f"{tree}-link"])
    odd = await make_tree(box, os.fsdecode(b"t\xff\xfe"))
    for root in (f"{tree}-link", odd):
        found = await box.grep("def", root, glob="src/*.py")
        assert sorted(found.text.splitlines()) == [f"{root}/src/app.py", f"{root}/src/util.py"]
        assert (await box.grep("def", root)).lines == 2  # (no glob: the root is followed all the same)


async def test_globs_without_ripgrep_work_or_are_refused_as_with_it(sb: Sandbox, minimal_box: Sandbox) -> None:
    """Without rg the files are listed and the glob picks among them in Python: `**/web/*.ts`
    (which find's -path could not say: its '*' matches '/') is src/web/index.ts and web/z.ts, not
    src/web/x/y.ts. What rg refuses is refused."""
    tree = await make_tree(minimal_box)
    await minimal_box.write(f"{tree}/src/web/x/y.ts", "hello again\n")
    await minimal_box.write(f"{tree}/web/z.ts", "hello at the top\n")
    found = await minimal_box.grep("hello", tree, glob="**/web/*.ts")
    assert sorted(found.text.splitlines()) == [f"{tree}/src/web/index.ts", f"{tree}/web/z.ts"]
    rg_tree = await make_tree(sb)
    assert (await sb.grep("hello", rg_tree, glob="**/web/*.ts")).text == f"{rg_tree}/src/web/index.ts"
    with pytest.raises(InvalidArgument, match="unbalanced braces"):
        await minimal_box.grep("hello", tree, glob="*.{py,ts")
    with pytest.raises(InvalidArgument, match="never closes"):  # (rg: "unclosed character class")
        await minimal_box.grep("hello", tree, glob="src/[ab.py")
    for glob in ("*.{py,ts", "src/[ab.py"):
        with pytest.raises(InvalidArgument, match="grep failed"):
            await sb.grep("hello", rg_tree, glob=glob)


async def test_a_glob_without_ripgrep_over_more_files_than_one_command_takes(minimal_box: Sandbox) -> None:
    """grep is given the files a glob picked in batches: a command's text has a limit (128 KiB
    for the `sh -c` of a shell that is not bash)."""
    root = f"{await minimal_box.home()}/many-{secrets.token_hex(4)}"
    await minimal_box.makedirs(root)
    name = "n" * 150
    script = 'cd "$1" && for i in $(seq 1 1500); do echo "needle $i" > "$2-$i.txt"; done; echo needle > other.md'
    await minimal_box.run(["sh", "-c", script, "sh", root, name])
    found = await minimal_box.grep("needle (1|750|1500)$", root, glob="*.txt", output_mode="content")
    assert found.engine == "grep" and not found.truncated
    assert found.text.splitlines() == [f"{root}/{name}-{i}.txt:1:needle {i}" for i in ("1", "1500", "750")]


async def test_multiline_and_head_limit(sb: Sandbox, tree: str) -> None:
    r = await sb.grep(r"def main\(\):\n\s+print", tree, multiline=True)
    assert r.text == f"{tree}/src/app.py"
    limited = await sb.grep("hello", tree, case_insensitive=True, head_limit=2)
    assert limited.lines == 2 and limited.truncated and limited.limited
    whole = await sb.grep("hello", tree, case_insensitive=True, head_limit=20)
    assert whole.lines == 5 and not whole.truncated and not whole.limited


async def big_tree(box: Sandbox) -> str:
    """3000 files: a tree no search gets through in a millisecond (a small one can be searched
    before the answer that it began is read, on a busy machine)."""
    root = f"{await box.home()}/big-{secrets.token_hex(4)}"
    script = 'mkdir -p "$1" && cd "$1" && i=0; while [ $i -lt 3000 ]; do echo "hello $i" > f$i.txt; i=$((i+1)); done'
    made = await box.exec_raw(["sh", "-c", script, "sh", root])
    assert made.exit_code == 0, made.stderr
    return root


async def test_a_search_over_its_time_is_stopped_and_says_to_narrow_it(
    sb: Sandbox, tree: str, minimal_box: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ripgrep, and without (grep's batches run together: their timeout is said as one).

    The searches go over /usr, whose listing alone takes a good part of a second: a search of a
    small tree can end before tether has read that it began, on a busy machine, and then no
    timeout is due."""
    plain_root = await big_tree(minimal_box)
    monkeypatch.setattr(search, "SEARCH_TIMEOUT_S", 0.001)
    for box in (sb, minimal_box):
        with pytest.raises(SearchTimeout, match=r"^grep in /usr ran over 0.001s and was stopped; search a narrow"):
            await box.grep("hello", "/usr")
        with pytest.raises(SearchTimeout, match=r"^glob in /usr ran over 0.001s and was stopped; search a narrower"):
            await box.glob("**/*.py", "/usr")
    monkeypatch.undo()
    # without ripgrep, a timeout of grep's batches (the listing before them in time)
    listing = search.Search._listing

    async def then_no_time(self: search.Search, argv: list[str]) -> object:
        listed = await listing(self, argv)
        monkeypatch.setattr(search, "SEARCH_TIMEOUT_S", 0.001)
        return listed

    monkeypatch.setattr(search.Search, "_listing", then_no_time)
    with pytest.raises(SearchTimeout, match=rf"^grep in {plain_root} ran over 0.001s and was stopped"):
        await minimal_box.grep("hello", plain_root)
    monkeypatch.undo()
    assert (await sb.grep("Hello", tree, output_mode="count")).lines == 2  # (its shells still serve)
    await minimal_box.run(["rm", "-rf", plain_root])


async def test_grep_argument_errors(sb: Sandbox, tree: str) -> None:
    with pytest.raises(InvalidArgument):
        await sb.grep("", tree)
    with pytest.raises(InvalidArgument):
        await sb.grep("x", tree, output_mode="everything")  # type: ignore[arg-type]
    with pytest.raises(FileNotFound):
        await sb.grep("x", f"{tree}/nowhere")
    with pytest.raises(InvalidArgument, match="grep failed"):
        await sb.grep("(unclosed", tree)


async def test_a_pattern_that_looks_like_an_option_is_a_pattern(sb: Sandbox, tree: str) -> None:
    await sb.write(f"{tree}/flags.txt", "use --files here\n")
    assert (await sb.grep("--files", tree)).text == f"{tree}/flags.txt"


async def test_glob_takes_backslash_escapes_as_ripgrep_does(sb: Sandbox, minimal_box: Sandbox) -> None:
    """A Next.js route's bracketed directory: `\\[slug\\]` is the name itself, for glob (with rg and
    without) as for grep's glob, relative or absolute."""
    for box in (sb, minimal_box):
        root = f"{await box.cwd()}/routes-{secrets.token_hex(3)}"
        await box.write(f"{root}/app/[slug]/page.tsx", "export default 1\n")
        await box.write(f"{root}/app/s/page.tsx", "export default 2\n")
        for pattern in ("app/\\[slug\\]/page.tsx", "app/\\[slug\\]/*.tsx", f"{root}/app/\\[slug\\]/*"):
            assert (await box.glob(pattern, root)).files == [f"{root}/app/[slug]/page.tsx"], pattern
        assert (await box.grep("export", root, glob="app/\\[slug\\]/*")).text == f"{root}/app/[slug]/page.tsx"
        with pytest.raises(InvalidArgument, match="lone backslash"):
            await box.glob("app\\", root)
        with pytest.raises(InvalidArgument, match="a glob pattern cannot contain a NUL byte"):
            await box.glob("a\0b", root)
        await box.run(["rm", "-rf", root])


async def test_glob_is_newest_first_and_respects_depth(sb: Sandbox, tree: str) -> None:
    assert (await sb.glob("**/*.py", tree)).files == [f"{tree}/src/util.py", f"{tree}/src/app.py"]
    assert (await sb.glob("*.md", tree)).files == [f"{tree}/README.md"]
    assert (await sb.glob("./src/*.py", tree)).files == (await sb.glob("src/*.py", tree)).files != []
    assert (await sb.glob("*.py", tree)).files == []  # no '**': top level only
    assert (await sb.glob("src/**/*.{ts,py}", tree)).files == [
        f"{tree}/src/web/index.ts",
        f"{tree}/src/util.py",
        f"{tree}/src/app.py",
    ]
    # a pattern that climbs searches from where it leads, as a shell's glob would
    assert (await sb.glob("../*.md", f"{tree}/src")).files == [f"{tree}/README.md"]
    assert (await sb.glob("src/../src/*.py", tree)).files == (await sb.glob("src/*.py", tree)).files
    with pytest.raises(InvalidArgument, match="after a wildcard"):
        await sb.glob("*/../*.md", tree)


async def test_glob_skips_gitignored_files_as_grep_does(sb: Sandbox) -> None:
    tree = await make_tree(sb)
    await sb.makedirs(f"{tree}/.git")
    await sb.write(f"{tree}/.gitignore", "ignored.md\nbuild/\n")
    await sb.write(f"{tree}/ignored.md", "x")
    await sb.write(f"{tree}/build/out.md", "x")
    assert (await sb.glob("*.md", tree)).files == [f"{tree}/README.md"]
    assert (await sb.glob("**/*.md", tree)).files == [f"{tree}/README.md"]
    assert (await sb.glob("*", tree)).files == [f"{tree}/.gitignore", f"{tree}/README.md"]


async def test_glob_lists_only_where_a_match_can_lie(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `*` at the top of a big tree, or `deep/dir/*.txt`, lists no more than it must: a listing of
    the whole tree would be cut short (here at 4 KiB) and miss the matches."""
    root = f"{await box.cwd()}/big-{secrets.token_hex(3)}"
    script = 'mkdir -p "$1/bulk/deep/dir" && cd "$1" && : >top1 && : >top2.txt && : >bulk/deep/dir/x.txt && cd bulk && '
    script += 'for i in $(seq 1 200); do : >"file-with-a-rather-long-name-$i.txt"; done'
    await box.run(["sh", "-c", script, "sh", root])
    monkeypatch.setattr(search, "LISTING_BYTES", 4096)
    top = await box.glob("*", root)
    assert sorted(top.files) == [f"{root}/top1", f"{root}/top2.txt"] and not top.truncated
    assert (await box.glob("bulk/deep/*/*.txt", root)).files == [f"{root}/bulk/deep/dir/x.txt"]
    assert (await box.glob("no/such/dir/*.txt", root)).files == []
    with pytest.raises(FileNotFound):  # (but a root that is not there is an error, however narrowed)
        await box.glob("bulk/*.txt", f"{root}/missing")
    with pytest.raises(InvalidArgument, match="is not a directory"):
        await box.glob("bulk/*.txt", f"{root}/top1")
    everything = await box.glob("**/*.txt", root)  # the whole tree it must list: it says it was cut
    assert everything.truncated and everything.listing_cut


async def test_glob_caps_at_100_and_says_so(sb: Sandbox) -> None:
    root = f"{await sb.cwd()}/lots"
    await sb.run(f"mkdir -p {root} && cd {root} && for i in $(seq 1 150); do : > f$i.log; done")
    r = await sb.glob("*.log", root)
    assert len(r.files) == 100 and r.truncated


async def test_grep_fallback_without_ripgrep(minimal_box: Sandbox) -> None:
    tree = await make_tree(minimal_box)
    r = await minimal_box.grep("hello", tree, case_insensitive=True)
    assert r.engine == "grep"
    assert sorted(r.text.splitlines()) == sorted(f"{tree}/{p}" for p in TREE)
    content = await minimal_box.grep("print", f"{tree}/src", output_mode="content")
    assert content.text == f"{tree}/src/app.py:4:    print('Hello')"
    count = await minimal_box.grep("return", tree, output_mode="count")
    assert sorted(count.text.splitlines()) == [f"{tree}/src/app.py:1", f"{tree}/src/util.py:1"]
    with pytest.raises(InvalidArgument, match="needs ripgrep"):
        await minimal_box.grep("a.b", tree, multiline=True)
    # a glob filter (busybox grep has no --include), .git skipped, one file as the root
    await minimal_box.write(f"{tree}/.git/config", "print hello\n")
    only_py = await minimal_box.grep("print", tree, glob="*.py")
    assert only_py.text.splitlines() == [f"{tree}/src/app.py"]
    assert (await minimal_box.grep("print", f"{tree}/src/app.py", output_mode="count")).text == (f"{tree}/src/app.py:1")
    with pytest.raises(InvalidArgument, match="grep failed"):
        await minimal_box.grep("(unclosed", tree)
    with pytest.raises(FileNotFound):
        await minimal_box.grep("x", f"{tree}/no-such-dir")


async def test_grep_fallback_patterns_that_mean_something_to_find_or_a_shell(minimal_box: Sandbox) -> None:
    """find ends -exec at a lone ';' and refuses a second '{}': the pattern must never reach it."""
    tree = f"{await minimal_box.home()}/odd-{secrets.token_hex(4)}"
    await minimal_box.write(f"{tree}/odd.txt", "a;b\nreturn {}\n--files $(x) `y` 'q'\n+\n")
    await minimal_box.write(f"{tree}/plain.txt", "nothing to see\n")
    for pattern in (";", "{}", "[{][}]", "--files", "[$][(]x[)]", "`y`", "'q'", "[+]"):
        found = await minimal_box.grep(pattern, tree)
        assert (found.engine, found.text) == ("grep", f"{tree}/odd.txt"), pattern
    assert (await minimal_box.grep("{}", tree, output_mode="content")).text == f"{tree}/odd.txt:2:return {{}}"


async def test_search_after_the_session_cwd_was_removed(box: Sandbox) -> None:
    """A command removed the directory the session stands in: searches by absolute path still
    work, a search with no match is no match (not "grep failed" over a note about the cwd)."""
    tree = await make_tree(box)
    doomed = f"{await box.home()}/doomed-{secrets.token_hex(4)}"
    await box.makedirs(doomed)
    await box.run(f"cd {doomed} && rmdir {doomed}")
    assert (await box.grep("no such text anywhere", tree)).text == ""
    assert (await box.grep("helper", tree)).text == f"{tree}/src/util.py"
    assert (await box.glob("*.md", tree)).files == [f"{tree}/README.md"]


async def test_glob_fallback_without_ripgrep(minimal_box: Sandbox) -> None:
    tree = await make_tree(minimal_box)
    assert (await minimal_box.glob("**/*.py", tree)).files == [f"{tree}/src/util.py", f"{tree}/src/app.py"]
    await minimal_box.write(f"{tree}/odd\nname.py", "")  # a newline in a name stays one name
    assert f"{tree}/odd\nname.py" in (await minimal_box.glob("*.py", tree)).files


async def test_names_that_mean_something_to_ripgreps_filters_are_found_by_both_engines(box: Sandbox) -> None:
    """glob's name filter, and grep -l's one path per line: the same files on both engines."""
    root = f"{await box.cwd()}/odd-{secrets.token_hex(3)}"
    names = ["foo[.txt", "file1.txt", "trail ", "#hash.txt", "a", "a\nb.txt", "c.txt"]
    for name in names:
        await box.write(f"{root}/{name}", "needle\n")
    for pattern, found in {
        "foo[.txt": ["foo[.txt"],
        "file[[:digit:]].txt": ["file1.txt"],
        "trail ": ["trail "],
        "#hash.txt": ["#hash.txt"],
        "a*": ["a", "a\nb.txt"],
    }.items():
        assert sorted((await box.glob(pattern, root)).files) == [f"{root}/{n}" for n in found], pattern
    result = await box.grep("needle", root)  # (one path each, the one with a newline too)
    assert result.lines == len(names) and all(f"{root}/{n}" in result.text for n in names)
    home_dir = f"tl-{secrets.token_hex(3)}"
    await box.write(f"~/{home_dir}/x.py", "")
    try:
        assert (await box.glob(f"~/{home_dir}/*.py", "/tmp")).files == [f"{await box.home()}/{home_dir}/x.py"]
    finally:
        await box.run(["rm", "-rf", f"{await box.home()}/{home_dir}"])


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("*.py", "a.py", True),
        ("*.py", "d/a.py", False),
        ("**/*.py", "d/e/a.py", True),
        ("**/*.py", "a.py", True),
        ("src/**", "src/x/y", True),
        ("?.txt", "a.txt", True),
        ("[ab].txt", "c.txt", False),
        ("[!ab].txt", "c.txt", True),
        ("*.{js,ts}", "x.ts", True),
        ("*.{js,ts}", "x.py", False),
        ("a+b(c).txt", "a+b(c).txt", True),
        ("[!]].py", "a.py", True),  # a ']' first in a set is one of its characters
        ("[!]].py", "].py", False),
        ("[]x].txt", "].txt", True),
        ("[[:digit:]_]*", "_x", True),
        ("[[:digit:]_]*", "x_", False),
        ("[a-c].txt", "b.txt", True),
        ("x[.txt", "x[.txt", True),  # a '[' that never closes is itself
        ("app/\\[slug\\]/*.tsx", "app/[slug]/page.tsx", True),  # a backslash makes the next character itself
        ("app/\\[slug\\]/*.tsx", "app/s/page.tsx", False),
        ("a\\*", "a*", True),
        ("a\\*", "ab", False),
    ],
)
def test_glob_translation(pattern: str, path: str, matches: bool) -> None:
    assert bool(glob_to_regex(pattern).match(path)) is matches


def test_unknown_character_classes_in_globs_are_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"unknown character class \[:nope:\]"):
        glob_to_regex("[[:nope:]].txt")


async def test_unreadable_files_are_no_matches_but_an_unreadable_root_is_an_error(engine: str, box: Sandbox) -> None:
    root = f"{await box.cwd()}/locked-{secrets.token_hex(3)}"
    await box.write(f"{root}/secret.txt", "needle\n")
    await box.write(f"{root}/closed/inside.txt", "needle\n")
    await box.run(["chmod", "000", f"{root}/secret.txt", f"{root}/closed"])
    try:
        result = await box.grep("needle", root)
        assert result.text == "" and result.lines == 0
        if engine == "rg":  # (busybox grep reads a file before it compiles the pattern)
            with pytest.raises(InvalidArgument, match="grep failed"):
                await box.grep("(broken", root)
        # ... but a root the user may not read is not "no matches"
        # (twice each: a root searched quickly once is searched with one thread next time, and
        # single-threaded rg words the error otherwise)
        for path in [f"{root}/secret.txt", f"{root}/closed", f"{root}/closed/"] * 2:
            with pytest.raises(PermissionDenied):
                await box.grep("needle", path)
        with pytest.raises(PermissionDenied):
            await box.glob("*", f"{root}/closed")
    finally:
        await box.run(["chmod", "-R", "u+rwX", root])


async def test_content_lines_end_at_newlines_only(sb: Sandbox) -> None:
    """A form feed or a lone carriage return inside a line is part of it."""
    root = f"{await sb.cwd()}/breaks-{secrets.token_hex(3)}"
    await sb.write(f"{root}/a.py", "foo\x0cbar\nx\rfoo\n")
    result = await sb.grep("foo", root, output_mode="content")
    assert (result.text, result.lines) == (f"{root}/a.py:1:foo\x0cbar\n{root}/a.py:2:x\rfoo", 2)


async def test_grep_answers_in_path_order_with_either_engine(engine: str, box: Sandbox) -> None:
    """Not in the order of the directories' entries (which is a hash order on most filesystems)."""
    root = f"{await box.cwd()}/order-{secrets.token_hex(3)}"
    names = [f"d{i % 3}/f{i:02d}.txt" for i in range(24)]
    await box.run(
        [
            "sh",
            "-c",
            'mkdir -p "$1" && cd "$1" && shift && for n; do mkdir -p "${n%/*}" && echo NEEDLE >"$n"; done',
            "sh",
            root,
            *names[::-1],
        ]
    )
    expected = sorted(f"{root}/{name}" for name in names)
    content = await box.grep("NEEDLE", root, output_mode="content")
    assert (content.engine, content.text.splitlines()) == (engine, [f"{path}:1:NEEDLE" for path in expected])
    count = await box.grep("NEEDLE", root, output_mode="count")
    assert count.text.splitlines() == [f"{path}:1" for path in expected]


async def test_grep_of_a_named_pipe_ends_with_a_clear_error(sb: Sandbox) -> None:
    """rg would wait for a writer forever; the pipe is noticed once the search takes a second."""
    pipe = f"{await sb.cwd()}/pipe-{secrets.token_hex(3)}"
    await sb.run(["mkfifo", pipe])
    try:
        with pytest.raises(SpecialFile, match="grep searches files and directories"):
            await asyncio.wait_for(sb.grep("foo", pipe), 10)
        assert (await asyncio.wait_for(sb.run("echo alive"), 10)).stdout == "alive\n"
    finally:
        await sb.run(["rm", "-f", pipe])


async def test_glob_follows_a_symlinked_root_without_ripgrep(minimal_box: Sandbox) -> None:
    tree = await make_tree(minimal_box)
    link = f"{tree}-link"
    await minimal_box.run(["ln", "-s", tree, link])
    assert (await minimal_box.glob("**/*.py", link)).files == [f"{link}/src/util.py", f"{link}/src/app.py"]


async def test_a_very_long_matching_line_is_cut_not_the_whole_answer(box: Sandbox) -> None:
    """A match in a minified file: its line is cut, and the other matches still come."""
    root = f"{await box.cwd()}/long-{secrets.token_hex(3)}"
    await box.write(f"{root}/a.min.js", "var a=1;" + "x" * 40_000 + "NEEDLE\n")
    await box.write(f"{root}/b.txt", "NEEDLE short line\n")
    result = await box.grep("NEEDLE", root, output_mode="content")
    first, second = result.text.splitlines()
    assert first.startswith(f"{root}/a.min.js:1:var a=1;xxx") and len(first) < 2200
    assert second == f"{root}/b.txt:1:NEEDLE short line"
