"""Tests for configurator.py: config files, --key=value overrides, type checks, --help and error reporting."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # also importable when run as plain `pytest`, not only `python -m pytest`
    sys.path.insert(0, str(REPO))

from gptsmith import configurator  # noqa: E402
from gptsmith.configurator import UserError, cli_errors, load_config, opt, read_overrides  # noqa: E402


@dataclass
class Cfg:
    """A toy configuration for the tests."""

    count: int = opt(3, "how many things to make")
    rate: float = opt(0.5, "how fast to make them")
    flag: bool = opt(False, "whether to make them at all")
    name: str = opt("out", "where to put them")
    limit: int | None = opt(None, "an optional cap; None means no cap")


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def user_error(argv: list[str], cls: type = Cfg) -> str:
    """The message of the UserError that loading argv raises."""
    with pytest.raises(UserError) as info:
        load_config(cls, argv)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# values: literals, raw-string fallback, types


def test_no_arguments_gives_the_defaults():
    assert load_config(Cfg, []) == Cfg(count=3, rate=0.5, flag=False, name="out", limit=None)
    assert read_overrides(Cfg, []) == {}


def test_overrides_are_parsed_as_python_literals():
    cfg = load_config(Cfg, ["--count=7", "--rate=1e-3", "--flag=True", "--name='quoted'", "--limit=5"])
    assert (cfg.count, cfg.rate, cfg.flag, cfg.name, cfg.limit) == (7, 0.001, True, "quoted", 5)
    assert type(cfg.count) is int and type(cfg.rate) is float and type(cfg.limit) is int


def test_read_overrides_returns_only_the_keys_set():
    assert read_overrides(Cfg, ["--count=-2", "--flag=False"]) == {"count": -2, "flag": False}


def test_value_that_is_not_a_literal_falls_back_to_the_raw_string():
    assert configurator.parse_value("hello world", str) == "hello world"
    assert configurator.parse_value("cuda:0", str) == "cuda:0"
    assert configurator.parse_value("[1, 2", int) == "[1, 2"  # a broken literal is kept as text ...
    assert "count must be int" in user_error(["--count=abc"])  # ... and then fails the type check
    assert load_config(Cfg, ["--name=out-shakespeare"]).name == "out-shakespeare"


def test_key_value_splits_on_the_first_equals_sign_only():
    assert load_config(Cfg, ["--name=a=b"]).name == "a=b"
    assert load_config(Cfg, ["--name==x="]).name == "=x="
    assert load_config(Cfg, ["--name="]).name == ""


@pytest.mark.parametrize("raw, expected", [("2", 2.0), ("-3", -3.0), ("1e-3", 1e-3), ("0.25", 0.25)])
def test_an_int_is_accepted_for_a_float_field_and_becomes_a_float(raw, expected):
    rate = load_config(Cfg, [f"--rate={raw}"]).rate
    assert rate == expected and type(rate) is float


@pytest.mark.parametrize("raw, expected", [("True", True), ("False", False)])
def test_bool_field_accepts_true_and_false(raw, expected):
    assert load_config(Cfg, [f"--flag={raw}"]).flag is expected


@pytest.mark.parametrize("raw", ["1", "0", "true", "false", "yes", "'True'", "None", "1.0"])
def test_bool_field_rejects_anything_else(raw):
    message = user_error([f"--flag={raw}"])
    assert "flag must be True or False" in message
    assert raw.strip("'") in message  # names the offending value


@pytest.mark.parametrize("raw, shown", [("3.5", "3.5"), ("abc", "'abc'"), ("True", "True"), ("None", "None")])
def test_int_field_rejects_floats_strings_bools_and_none(raw, shown):
    message = user_error([f"--count={raw}"])
    assert message.startswith("count must be int, got ")
    assert shown in message


@pytest.mark.parametrize("raw", ["True", "fast", "None", "[1]"])
def test_float_field_rejects_bools_strings_and_other_literals(raw):
    assert user_error([f"--rate={raw}"]).startswith("rate must be float, got ")


@pytest.mark.parametrize("raw", ["2024", "1e3", "True", "None", "[1, 2]", "0.5"])
def test_str_field_keeps_the_raw_text_of_other_literals(raw):
    name = load_config(Cfg, [f"--name={raw}"]).name
    assert name == raw and type(name) is str


def test_optional_int_field_accepts_none_and_ints_only():
    assert load_config(Cfg, ["--limit=None"]).limit is None
    assert load_config(Cfg, ["--limit=12"]).limit == 12
    for raw in ("abc", "1.5", "False"):
        assert user_error([f"--limit={raw}"]).startswith("limit must be int")


def test_coerce_directly():
    assert configurator.coerce("k", 3, float) == 3.0 and type(configurator.coerce("k", 3, float)) is float
    assert configurator.coerce("k", None, int | None) is None
    assert configurator.coerce("k", 4, int | None) == 4
    with pytest.raises(UserError, match=r"^k must be int or None, got 'x' \(str\)$"):
        configurator.coerce("k", "x", int | None)
    with pytest.raises(UserError, match=r"^k must be float, got True \(bool\)$"):
        configurator.coerce("k", True, float)
    with pytest.raises(UserError, match=r"^k must be True or False, got 1 \(int\)$"):
        configurator.coerce("k", 1, bool)


# ---------------------------------------------------------------------------------------------------------------------
# config files


def test_config_file_is_plain_python_assignments(tmp_path):
    path = write(
        tmp_path,
        "cfg.py",
        "import math\n"
        "from os import path as _path\n"
        "_base = 4  # private helper names are not keys\n"
        "count = _base * 2\n"
        "rate = math.sqrt(0.25)\n"
        "def helper():\n"
        "    return 'ignored'\n"
        "class Helper:\n"
        "    pass\n"
        "name = 'run-' + str(count)\n"
        "flag = count > 5\n",
    )
    assert read_overrides(Cfg, [path]) == {"count": 8, "rate": 0.5, "name": "run-8", "flag": True}


def test_config_file_values_are_type_checked(tmp_path):
    assert load_config(Cfg, [write(tmp_path, "a.py", "rate = 2\n")]).rate == 2.0
    assert type(load_config(Cfg, [write(tmp_path, "b.py", "rate = 2\n")]).rate) is float
    assert user_error([write(tmp_path, "c.py", "count = 'three'\n")]).startswith("count must be int, got 'three'")
    assert "flag must be True or False" in user_error([write(tmp_path, "d.py", "flag = 1\n")])


def test_later_files_and_overrides_win(tmp_path):
    a = write(tmp_path, "a.py", "count = 1\nname = 'from-a'\n")
    b = write(tmp_path, "b.py", "count = 2\nrate = 0.75\n")
    cfg = load_config(Cfg, [a, b])
    assert (cfg.count, cfg.name, cfg.rate) == (2, "from-a", 0.75)
    assert load_config(Cfg, [b, a]).count == 1
    assert load_config(Cfg, [a, b, "--count=9"]).count == 9
    assert load_config(Cfg, ["--count=9", a]).count == 1  # order, not kind, decides
    assert load_config(Cfg, ["--count=9", "--count=10"]).count == 10


def test_a_non_py_file_given_positionally_is_read_as_a_config(tmp_path):
    assert load_config(Cfg, [write(tmp_path, "settings.txt", "count = 11\n")]).count == 11


def test_train_config_from_the_shipped_config_file_plus_override():
    from gptsmith.config import TrainConfig

    explicit = read_overrides(TrainConfig, [str(REPO / "config" / "shakespeare_char.py"), "--batch_size=3"])
    assert explicit["batch_size"] == 3
    assert explicit["block_size"] == 256 and explicit["dropout"] == 0.2 and type(explicit["dropout"]) is float
    assert explicit["always_save_checkpoint"] is False and explicit["out_dir"] == "out-shakespeare-char"


def test_every_shipped_config_file_is_a_valid_train_config():
    from gptsmith.config import TrainConfig

    for path in sorted((REPO / "config").glob("*.py")):
        cfg = load_config(TrainConfig, [str(path)])  # validation runs in __post_init__
        assert cfg.out_dir != "out", path  # each writes to its own folder
    speedrun = load_config(TrainConfig, [str(REPO / "config" / "shakespeare_char_speedrun.py")])
    assert speedrun.device == "cpu" and speedrun.eval_iters == 0 and not speedrun.eval_train


def test_train_config_types_and_raw_str():
    from gptsmith.config import TrainConfig

    cfg = load_config(TrainConfig, ["--out_dir=2024", "--learning_rate=1", "--compile=False", "--min_lr=0"])
    assert cfg.out_dir == "2024" and cfg.learning_rate == 1.0 and type(cfg.learning_rate) is float
    assert cfg.compile is False and cfg.min_lr == 0.0
    assert load_config(TrainConfig, []) == TrainConfig()
    assert "batch_size must be int" in user_error(["--batch_size=3.0"], TrainConfig)
    assert "compile must be True or False" in user_error(["--compile=1"], TrainConfig)


# ---------------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "arg, wanted",
    [("--batchsize=3", "batch_size"), ("--learningrate=1e-3", "learning_rate"), ("--n_layers=2", "n_layer")],
)
def test_unknown_key_suggests_the_closest_key(arg, wanted):
    from gptsmith.config import TrainConfig

    key = arg[2:].split("=")[0]
    message = user_error([arg], TrainConfig)
    assert f"unknown config key '{key}'" in message
    assert message.endswith(f"did you mean {wanted}?")


def test_unknown_key_without_a_close_match_points_to_help():
    message = user_error(["--zzzzzz=1"])
    assert "unknown config key 'zzzzzz'" in message and "--help" in message and "did you mean" not in message


def test_unknown_key_in_a_config_file_names_the_file(tmp_path):
    from gptsmith.config import TrainConfig

    path = write(tmp_path, "cfg.py", "batch_size = 4\nbatchsize = 3\n")
    message = user_error([path], TrainConfig)
    assert f"unknown config key 'batchsize' in {path}" in message and "did you mean batch_size?" in message


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "missing_config.py")
    assert user_error([path]) == f"config file {path} not found"


def test_config_file_with_a_syntax_error_reports_file_and_line(tmp_path):
    path = write(tmp_path, "bad.py", "count = 1\nname = 'x'\nrate = = 2\nflag = True\n")
    message = user_error([path])
    assert message.startswith(f"{path}:3: syntax error")


@pytest.mark.parametrize(
    "source, line, what",
    [
        ("count = 1\n\nrate = 1 / 0\n", 3, "ZeroDivisionError: division by zero"),
        ("count = undefined_name\n", 1, "NameError"),
        ("def f():\n    raise ValueError('bad value')\n\ncount = f()\n", 2, "ValueError: bad value"),
        ("import json\nx = 1\ncount = json.loads('{')\n", 3, "JSONDecodeError"),
    ],
)
def test_config_file_that_raises_reports_file_and_line(tmp_path, source, line, what):
    path = write(tmp_path, "raises.py", source)
    message = user_error([path])
    assert message.startswith(f"{path}:{line}: ")
    assert what in message


@pytest.mark.parametrize("arg", ["foo", "batch_size=3", "-x"])
def test_positional_argument_that_is_not_a_config_file(tmp_path, monkeypatch, arg):
    monkeypatch.chdir(tmp_path)  # an empty folder, so `arg` is certainly not a file
    assert user_error([arg]) == f"'{arg}' is neither a config file nor --key=value"


@pytest.mark.parametrize("arg", ["--flag", "--count"])
def test_key_without_equals_sign(arg):
    assert user_error([arg]) == f"expected --key=value, got '{arg}'"


def test_errors_are_user_errors_not_other_exceptions(tmp_path):
    assert issubclass(UserError, Exception) and not issubclass(UserError, (ValueError, TypeError))
    for argv in (["--nope=1"], ["--count=x"], ["--count"], [str(tmp_path / "none.py")], ["not-a-file"]):
        with pytest.raises(UserError):
            load_config(Cfg, argv)


# ---------------------------------------------------------------------------------------------------------------------
# --help


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_key_with_default_and_meaning_and_exits_0(capsys, flag):
    with pytest.raises(SystemExit) as info:
        load_config(Cfg, ["--count=5", flag, "--nope=1"])  # stops at --help, before the bad key
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "A toy configuration for the tests." in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip().startswith("--")}
    assert set(lines) == {"--count", "--rate", "--flag", "--name", "--limit"}
    assert "how many things to make" in lines["--count"] and "default 3]" in lines["--count"]
    assert "int" in lines["--count"]
    assert "default 0.5]" in lines["--rate"] and "float" in lines["--rate"]
    assert "default False]" in lines["--flag"] and "bool" in lines["--flag"]
    assert "default 'out']" in lines["--name"] and "where to put them" in lines["--name"]
    assert "int or None, default None]" in lines["--limit"]


def test_help_for_train_config_covers_every_field(capsys):
    from gptsmith.config import TrainConfig

    with pytest.raises(SystemExit) as info:
        read_overrides(TrainConfig, ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip().startswith("--")}
    fields = [f for f in dataclasses.fields(TrainConfig) if f.init]
    assert set(lines) == {f"--{f.name}" for f in fields}
    for f in fields:
        assert f.metadata["help"] in lines[f"--{f.name}"], f.name
        assert f"default {f.default!r}]" in lines[f"--{f.name}"], f.name


# ---------------------------------------------------------------------------------------------------------------------
# cli_errors and the command-line contract


def test_cli_errors_turns_user_error_into_exit_2_and_one_line(capsys):
    with pytest.raises(SystemExit) as info, cli_errors():
        raise UserError("batch_size must be positive, got 0")
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == "error: batch_size must be positive, got 0\n" and captured.out == ""


def test_cli_errors_passes_success_and_other_exceptions_through(capsys):
    with cli_errors():
        pass
    with pytest.raises(ZeroDivisionError), cli_errors():
        1 / 0  # noqa: B018 - a bug, not a user error: it must keep its traceback
    with pytest.raises(SystemExit) as info, cli_errors():
        raise KeyboardInterrupt
    assert info.value.code == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def fail_as_user():
    raise UserError("bad")


def fail_as_bug():
    return 1 / 0


@pytest.mark.parametrize("body", [lambda: None, fail_as_user, fail_as_bug], ids=["success", "user-error", "bug"])
def test_a_command_freezes_what_outlives_it_and_unfreezes_when_it_ends(body, capsys):
    """Inside a command the objects that existed before it are frozen (left out of full garbage
    collections); after it, however it ends, nothing is, so an in-process caller's garbage stays
    collectable."""
    import gc

    try:
        with cli_errors():
            assert gc.get_freeze_count() > 0
            body()
    except (SystemExit, ZeroDivisionError):
        pass
    assert gc.get_freeze_count() == 0


def test_a_command_process_freezes_everything_at_exit(tmp_path):
    """At exit the process's last garbage collection skips every object (the OS frees the memory):
    gc.freeze runs among the exit handlers, after the command's own (checked by one registered first)."""
    script = tmp_path / "command.py"
    script.write_text(
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
        "from gptsmith.configurator import cli_errors\n"
        "with cli_errors():\n"
        "    pass\n"
        "print('frozen after the command:', gc.get_freeze_count() > 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, check=True).stdout
    assert out.splitlines() == ["frozen after the command: False", "frozen at exit: True"]


def test_load_config_error_through_cli_errors(capsys):
    with pytest.raises(SystemExit) as info, cli_errors():
        load_config(Cfg, ["--cuont=1"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: unknown config key 'cuont'; did you mean count?\n"


CLI_CASES = {
    "train-unknown-key": (["train.py", "--batchsize=3"], "did you mean batch_size?"),
    "sample-unknown-key": (["sample.py", "--nope=1"], "unknown config key 'nope'"),
    "train-missing-config": (["train.py", "missing_config.py"], "config file missing_config.py not found"),
}


@pytest.fixture(scope="module")
def cli_results():
    """Run the entry points once, concurrently (each pays for importing torch)."""
    assert not (REPO / "missing_config.py").exists()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, (args, _) in CLI_CASES.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        results[name] = (proc.returncode, out, err)
    return results


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_entry_points_report_user_errors_as_one_line_and_exit_2(cli_results, case):
    code, out, err = cli_results[case]
    assert code == 2, err
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("error: ")
    assert CLI_CASES[case][1] in lines[0]


def test_a_mistyped_config_file_gets_a_suggestion(tmp_path):
    (tmp_path / "shakespeare_char.py").write_text("batch_size = 2\n")
    with pytest.raises(
        UserError, match=r"config file .*shakespeare_chr\.py not found; did you mean .*shakespeare_char\.py\?"
    ):
        read_overrides(Cfg, [str(tmp_path / "shakespeare_chr.py")])


def test_help_names_the_program(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/somewhere/train.py"])
    assert "usage: python train.py [CONFIG.py ...]" in configurator.help_text(Cfg)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/gptsmith-sample"])
    assert "usage: gptsmith-sample [CONFIG.py ...]" in configurator.help_text(Cfg)
