"""Settings (main.py's block and findpeople/settings.py): one flag per setting, validated
overrides, one frozen Settings (rules 2-4)."""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from findpeople.settings import _LIMITS, changed_settings, flag_name, setting_comments
from findpeople.run import run_header

HEAVY_MODULES = ("onnxruntime", "insightface", "tensorrt", "av", "cv2")
ALIASES = ("--videos", "--refs", "--output", "--model-root", "--model-pack", "--providers")


def run_python(*args: str) -> subprocess.CompletedProcess:
    """Run the venv's Python in the repository root, capturing text output."""
    env = {**os.environ, "COLUMNS": "200"}  # wide help lines: one line per option's help
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def help_entries(help_text: str) -> dict:
    """Return {flag: that option's whole help entry} parsed from argparse's --help output."""
    entries, current = [], []
    for line in help_text.splitlines():
        if re.match(r"^  -", line):
            current = [line]
            entries.append(current)
        elif current and line.startswith("   "):
            current.append(line)
        else:
            current = []
    by_flag = {}
    for lines in entries:
        invocation = re.split(r"\s{2,}", lines[0].strip())[0]
        text = " ".join(part.strip() for part in lines)
        for flag in re.findall(r"--[\w-]+", invocation):
            by_flag[flag] = text
    return by_flag


def settings_constant_reads(source: str, setting_names) -> list:
    """Return (function or '<module>', name, line) for every read of a setting constant.

    Only `default_settings` may read the constants; anything else must use `settings.<NAME>`,
    because spawned children re-import main.py and would see the defaults, not the overrides.
    Default argument values and decorators count as reads by the function they belong to.
    """
    names = set(setting_names)
    hits = []

    class Visitor(ast.NodeVisitor):
        def __init__(self):
            self.functions = []

        def visit_FunctionDef(self, node):
            self.functions.append(node.name)
            self.generic_visit(node)
            self.functions.pop()

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_Lambda(self, node):
            self.functions.append("<lambda>")
            self.generic_visit(node)
            self.functions.pop()

        def visit_Name(self, node):
            if isinstance(node.ctx, ast.Load) and node.id in names:
                if not self.functions or self.functions[0] != "default_settings":
                    where = self.functions[-1] if self.functions else "<module>"
                    hits.append((where, node.id, node.lineno))

    Visitor().visit(ast.parse(source))
    return hits


# Import and --help ---------------------------------------------------------------------------
def test_importing_main_loads_no_heavy_library_and_prints_nothing():
    """`import main` in a fresh interpreter prints nothing and loads none of onnxruntime,
    insightface, tensorrt, av or cv2 (rule 3: decoders never load an inference runtime)."""
    code = ("import sys, json\n"
            "import main\n"
            f"heavy = {HEAVY_MODULES!r}\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
            "print(json.dumps(loaded))\n")
    done = run_python("-c", code)
    assert done.returncode == 0, f"import failed (exit {done.returncode}):\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert lines[:-1] == [] and done.stderr == "", \
        f"importing main printed stdout={lines[:-1]!r} stderr={done.stderr!r}"
    assert json.loads(lines[-1]) == [], f"importing main loaded heavy modules: {lines[-1]}"


@pytest.fixture(scope="module")
def help_text():
    """The output of `python main.py --help`."""
    done = run_python("main.py", "--help")
    assert done.returncode == 0, f"--help exit code {done.returncode}:\n{done.stderr}"
    return done.stdout


def test_help_lists_a_flag_with_its_default_for_every_setting(main_module, help_text):
    """`--help` shows one flag per recorded setting, spelled from its name, with its default."""
    entries = help_entries(help_text)
    defaults = main_module.default_settings()
    missing = [flag_name(n) for n in main_module.SETTING_NAMES
               if flag_name(n) not in entries]
    assert not missing, f"--help lacks flags {missing}; it lists {sorted(entries)}"
    no_default = {flag_name(n): entries[flag_name(n)]
                  for n in main_module.SETTING_NAMES
                  if f"(default: {defaults[n]})" not in entries[flag_name(n)]}
    assert not no_default, f"these help entries do not show their default: {no_default}"


@pytest.mark.parametrize("alias", ALIASES)
def test_help_lists_the_short_aliases(help_text, alias):
    """`--help` lists the aliases users type most (--videos, --refs, --output, ...)."""
    entries = help_entries(help_text)
    assert alias in entries, f"{alias} missing from --help; it lists {sorted(entries)}"


def test_flag_names_are_spelled_from_setting_names(main_module):
    """A setting's flag is its name in lower case with dashes (DET_SIZE -> --det-size)."""
    pairs = {"DET_SIZE": "--det-size", "CUSTOM_THRESHOLD": "--custom-threshold",
             "det_prob_threshold": "--det-prob-threshold", "debug_det": "--debug-det"}
    spelled = {name: flag_name(name) for name in pairs}
    assert spelled == pairs, f"flag_name gave {spelled}"


# Overrides -----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, name, expected", [
    (["--custom-threshold", "0.7"], "CUSTOM_THRESHOLD", 0.7),
    (["--custom-threshold", "1"], "CUSTOM_THRESHOLD", 1.0),
    (["--det-size", "640"], "DET_SIZE", (640, 640)),
    (["--det-size", "320x256"], "DET_SIZE", (320, 256)),
    (["--det-size", "320"], "DET_SIZE", (320, 320)),
    (["--frame-interval", "2"], "FRAME_INTERVAL", 2),
    (["--num-cpu-loaders", "4"], "NUM_CPU_LOADERS", 4),
    (["--debug-det"], "debug_det", True),
    (["--debug-det", "--no-debug-det"], "debug_det", False),
    (["--providers", "cpu"], "PROVIDERS", "cpu"),
    (["--videos", "my_videos"], "VIDEO_DIR", "my_videos"),
    (["--refs", "my_refs"], "REFERENCE_DIR", "my_refs"),
    (["--output", "my_output"], "OUTPUT_DIR", "my_output"),
    (["--video-dir", "v2"], "VIDEO_DIR", "v2"),
    (["--model-pack", "buffalo_sc"], "MODEL_PACK_NAME", "buffalo_sc"),
    (["--model-root", "/models"], "MODEL_ROOT", "/models"),
    (["--no-resume"], "RESUME", False),
    (["--force"], "RESUME", False),  # --force: the same as --no-resume
    (["--force", "--resume"], "RESUME", True),  # the last one wins
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_flag_overrides_its_setting_with_the_default_s_type(main_module, argv, name, expected):
    """Each flag (or alias) sets its setting, typed like the default; nothing else changes."""
    settings = main_module.load_settings(argv)
    value = getattr(settings, name)
    assert value == expected and type(value) is type(expected), \
        f"{argv} gave {name}={value!r} ({type(value).__name__}), expected {expected!r}"
    others = {k: v for k, v in changed_settings(settings, main_module.default_settings()).items() if k != name}
    assert others == {}, f"{argv} also changed {others}"


def test_no_flags_give_the_settings_block_defaults(main_module):
    """Without flags every setting has the value written in the settings block."""
    settings = main_module.load_settings([])
    assert settings.values == main_module.default_settings(), \
        f"differences: {changed_settings(settings, main_module.default_settings())}"
    assert set(settings.values) == set(main_module.SETTING_NAMES)


@pytest.mark.parametrize("argv, expected", [
    ([], {}),
    (["--custom-threshold", "0.7", "--frame-interval", "2"],
     {"CUSTOM_THRESHOLD": 0.7, "FRAME_INTERVAL": 2}),
    (["--det-size", "640"], {}),  # same as the default: not a change
    (["--debug-rec"], {"debug_rec": True}),
    (["--no-debug-rec"], {}),
    (["--det-size", "320x256", "--refs", "people"], {"DET_SIZE": (320, 256), "REFERENCE_DIR": "people"}),
])
def test_changed_settings_are_exactly_the_overridden_ones(main_module, argv, expected):
    """changed_settings returns the settings whose value differs from the block, and only those."""
    changed = changed_settings(main_module.load_settings(argv), main_module.default_settings())
    assert changed == expected, f"{argv}: changed_settings gave {changed}, expected {expected}"


@pytest.mark.parametrize("argv, index_only, reindex, resume", [
    ([], False, False, True),
    (["--index-only"], True, False, True),
    (["--reindex"], False, True, True),
    (["--force"], False, False, False),  # RESUME off: reindex and remake every snapshot and clip
    (["--index-only", "--reindex", "--index-dir", "idx"], True, True, True),
])
def test_index_only_and_reindex_are_run_modes_not_settings(main_module, help_text, argv, index_only,
                                                           reindex, resume):
    """--index-only and --reindex are listed in --help and say how this run goes, but are no
    settings (not saved in results.json, not changes of the block); --force is RESUME off."""
    args = main_module.parse_command_line(argv)
    settings = main_module.load_settings(argv)
    assert (args.index_only, args.reindex, settings.RESUME) == (index_only, reindex, resume), argv
    assert not {"index_only", "reindex"} & set(settings.values), sorted(settings.values)
    changed = changed_settings(settings, main_module.default_settings())
    assert set(changed) <= {"RESUME", "INDEX_DIR"}, changed
    entries = help_entries(help_text)
    assert {"--index-only", "--reindex", "--force", "--index-dir"} <= set(entries), sorted(entries)


def test_settings_cannot_be_changed_after_loading(main_module):
    """Settings is frozen: neither an attribute nor an entry of its values can be reassigned."""
    settings = main_module.load_settings([])
    with pytest.raises((dataclasses.FrozenInstanceError, AttributeError)):
        settings.CUSTOM_THRESHOLD = 0.1
    with pytest.raises(TypeError):
        settings.values["CUSTOM_THRESHOLD"] = 0.1
    assert settings.CUSTOM_THRESHOLD == main_module.default_settings()["CUSTOM_THRESHOLD"], \
        f"settings changed after loading: CUSTOM_THRESHOLD={settings.CUSTOM_THRESHOLD}"


def test_settings_survive_pickling_for_spawned_children(main_module):
    """Children receive Settings by pickle: the overrides arrive unchanged."""
    settings = main_module.load_settings(["--custom-threshold", "0.7", "--det-size", "320x256"])
    copy = pickle.loads(pickle.dumps(settings))
    assert copy == settings and (copy.CUSTOM_THRESHOLD, copy.DET_SIZE) == (0.7, (320, 256)), \
        f"after pickling: {copy.values}"


def test_unknown_setting_attribute_raises_attribute_error(main_module):
    """Reading a setting that does not exist is an AttributeError, not a silent None."""
    settings = main_module.load_settings([])
    with pytest.raises(AttributeError, match="NO_SUCH_SETTING"):
        settings.NO_SUCH_SETTING


def test_the_saved_configuration_holds_every_effective_setting(main_module):
    """results.json's run header stores every setting with its effective (overridden) value."""
    settings = main_module.load_settings(["--custom-threshold", "0.7", "--det-size", "320x256"])
    saved = json.loads(json.dumps(run_header(settings, [], None)))["settings"]
    assert set(saved) == set(main_module.SETTING_NAMES), \
        f"saved settings differ from SETTING_NAMES: {set(saved) ^ set(main_module.SETTING_NAMES)}"
    assert (saved["CUSTOM_THRESHOLD"], saved["DET_SIZE"]) == (0.7, [320, 256]), f"saved {saved}"


# Validation ----------------------------------------------------------------------------------
OUT_OF_RANGE = [
    (["--custom-threshold", "3"], "--custom-threshold"),
    (["--custom-threshold", "-0.1"], "--custom-threshold"),
    (["--custom-threshold", "nan"], "--custom-threshold"),
    (["--frame-interval", "0"], "--frame-interval"),
    (["--det-size", "100"], "--det-size"),  # not a multiple of 32
    (["--det-size", "16"], "--det-size"),  # below 32
    (["--det-size", "640x5000"], "--det-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--pre-upscale-factor", "9"], "--pre-upscale-factor"),
    (["--pre-upscale-factor", "0.5"], "--pre-upscale-factor"),
    (["--det-prob-threshold", "1.5"], "--det-prob-threshold"),
    (["--num-gpu-processes", "0"], "--num-gpu-processes"),
    (["--num-cpu-loaders", "33"], "--num-cpu-loaders"),
    (["--max-buffer-slots", "1"], "--max-buffer-slots"),
    (["--box-padding-percentage", "101"], "--box-padding-percentage"),
    (["--merge-gap-tolerance", "-1"], "--merge-gap-tolerance"),
    (["--clip-duration-before", "601"], "--clip-duration-before"),
]


@pytest.mark.parametrize("argv, flag", OUT_OF_RANGE, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_out_of_range_value_makes_main_exit_2_naming_the_flag(main_module, capsys, tmp_path, argv, flag):
    """main() returns 2 and prints an error that names the flag before doing any work."""
    # A missing video folder also returns 2, but its message does not name the flag.
    code = main_module.main([*argv, "--videos", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2, f"{argv}: main returned {code}; stderr: {err}"
    assert flag in err, f"{argv}: the error does not name {flag}: {err!r}"


@pytest.mark.parametrize("argv, flag", OUT_OF_RANGE, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_out_of_range_value_makes_load_settings_raise_value_error_naming_the_flag(main_module, argv, flag):
    """load_settings raises ValueError (never an assert) whose message names the flag."""
    with pytest.raises(ValueError) as caught:
        main_module.load_settings(argv)
    assert flag in str(caught.value), f"{argv}: {caught.value!r} does not name {flag}"


@pytest.mark.parametrize("argv", [
    ["--custom-threshold", "0"], ["--custom-threshold", "2"], ["--frame-interval", "1000"],
    ["--det-size", "32"], ["--det-size", "4096x32"], ["--pre-upscale-factor", "4"],
    ["--batch-size", "256"], ["--merge-gap-tolerance", "0"],
], ids=" ".join)
def test_values_at_the_limits_are_accepted(main_module, argv):
    """The allowed ranges are inclusive: the limits themselves load without error."""
    settings = main_module.load_settings(argv)
    changed = changed_settings(settings, main_module.default_settings())
    assert len(changed) == 1, f"{argv} loaded as {changed}, expected exactly one changed setting"


# Rule 4: only default_settings reads the constants -------------------------------------------
@pytest.mark.parametrize("path", ["main.py", *sorted(p.relative_to(REPO).as_posix()
                                                    for p in (REPO / "findpeople").glob("*.py"))])
def test_no_code_outside_default_settings_reads_a_setting_constant(main_module, path):
    """Below the settings block, and in every module of the package, code receives `settings`;
    no function reads a setting constant."""
    source = (REPO / path).read_text(encoding="utf-8")
    hits = settings_constant_reads(source, main_module.SETTING_NAMES)
    assert hits == [], f"{path}: setting constants read outside default_settings (function, name, line): {hits}"


@pytest.mark.parametrize("source, expected", [
    ("def f(settings):\n    return CUSTOM_THRESHOLD * 2\n", [("f", "CUSTOM_THRESHOLD", 2)]),
    ("def f(x=BATCH_SIZE):\n    return x\n", [("f", "BATCH_SIZE", 1)]),
    ("def outer():\n    def inner():\n        return VIDEO_DIR\n    return inner\n",
     [("inner", "VIDEO_DIR", 3)]),
    ("class C:\n    def m(self):\n        return debug_det\n", [("m", "debug_det", 3)]),
    ("key = lambda: FRAME_INTERVAL\n", [("<lambda>", "FRAME_INTERVAL", 1)]),
    ("LIMIT = CUSTOM_THRESHOLD + 1\n", [("<module>", "CUSTOM_THRESHOLD", 1)]),
], ids=["body", "default-arg", "nested", "method", "lambda", "module-level"])
def test_constant_read_check_flags_code_reading_a_setting(main_module, source, expected):
    """The AST check above can fail: it flags a function that reads a setting constant."""
    hits = settings_constant_reads(source, main_module.SETTING_NAMES)
    assert hits == expected, f"check returned {hits} for:\n{source}"


@pytest.mark.parametrize("source", [
    "def f(settings):\n    return settings.CUSTOM_THRESHOLD\n",
    "def default_settings():\n    return {'CUSTOM_THRESHOLD': CUSTOM_THRESHOLD}\n",
    "CUSTOM_THRESHOLD = 0.6  # cosine distance\n",
    "def f(values):\n    return values['BATCH_SIZE']\n",
], ids=["attribute", "default_settings", "assignment", "string-key"])
def test_constant_read_check_allows_settings_attributes(main_module, source):
    """The check does not flag `settings.X`, default_settings itself, or the block's assignments."""
    hits = settings_constant_reads(source, main_module.SETTING_NAMES)
    assert hits == [], f"check wrongly flagged {hits} in:\n{source}"


# Rule 2: the settings block documents every setting ------------------------------------------
def test_every_setting_has_an_inline_comment(main_module):
    """Each name in SETTING_NAMES carries an inline comment in the settings block (shown in --help)."""
    comments = setting_comments(Path(main_module.__file__), main_module.SETTING_NAMES)
    missing = [n for n in main_module.SETTING_NAMES if not comments.get(n, "").strip()]
    assert not missing, f"settings without an inline comment: {missing}"


def test_every_numeric_setting_comment_states_the_validated_range(main_module):
    """A number's comment gives 'low..high', and that range is the one validation enforces."""
    comments = setting_comments(Path(main_module.__file__), main_module.SETTING_NAMES)
    wrong = {}
    for name, limits in _LIMITS.items():
        comment = comments.get(name, "")
        if isinstance(limits[0], str):
            if not all(choice in comment for choice in limits):
                wrong[name] = (comment, limits)
            continue
        found = re.search(r"(-?\d+(?:\.\d+)?)\.\.(-?\d+(?:\.\d+)?)", comment)
        if not found or (float(found.group(1)), float(found.group(2))) != tuple(map(float, limits)):
            wrong[name] = (comment, limits)
    assert not wrong, f"comment range differs from validation (comment, limits): {wrong}"
