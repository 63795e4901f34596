"""common/cli.py: every flag is checked before any work (ranges, NaN, world-size divisibility),
presets fill only what was not given, and run_cli turns each kind of failure into one line on
stderr and its documented exit code. (Every bad input of every script, end to end:
test_bad_inputs.py.)"""

import argparse
import math
import re

import pytest

import simclr
from common import cli
from common.cli import ConfigError, apply_preset, check_args, check_range


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--blur", "-0.1"], "--blur must be in [0, 1]"),
        (["--jitter-strength=-1"], "--jitter-strength must be in [0, inf)"),
        (["--momentum", "1"], "--momentum must be in [0, 1)"),
        (["--lars-eta", "0"], "--lars-eta must be in (0, inf)"),
        (["--lr", "nan"], "--lr must be in [0, inf)"),
        (["--weight-decay=-1e-4"], "--weight-decay must be in [0, inf)"),
        (["--warmup-epochs", "inf"], "--warmup-epochs must be in [0, inf)"),
        (["--ckpt-minutes=-1"], "--ckpt-minutes must be in [0, inf)"),
        (["--temperature", "nan"], "--temperature must be in (0, inf)"),
        (["--proj-dim", "0"], "--proj-dim must be > 0"),
    ],
)
def test_every_float_flag_is_range_checked_before_any_work(tmp_path, argv, msg):
    args = simclr.get_args_parser().parse_args(
        ["--preset", "tiny", "--data", "/not/read", "--out", str(tmp_path / "r"), *argv]
    )
    with pytest.raises(ConfigError, match=re.escape(msg)):
        simclr.main(apply_preset(args, simclr.PRESETS))
    assert not (tmp_path / "r").exists()


def test_batch_not_divisible_by_world_size():
    args = apply_preset(
        simclr.get_args_parser().parse_args(["--preset", "tiny", "--batch-size", "100"]),
        simclr.PRESETS,
    )
    check_args(args, 4)  # 100 / 4 is fine
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        check_args(args, 3)


@pytest.mark.parametrize(
    "value,lo,hi,lo_open,hi_open,ok",
    [
        (0.0, 0, math.inf, False, False, True),  # [0, inf): 0 is in
        (0.0, 0, math.inf, True, False, False),  # (0, inf): 0 is out
        (1.0, 0, 1, False, True, False),  # [0, 1): 1 is out
        (1.0, 0, 1, False, False, True),
        (math.inf, 0, math.inf, False, False, False),  # inf itself is refused
        (math.nan, -math.inf, math.inf, False, False, False),  # NaN passes every `<` check
        (None, 0, 1, False, False, True),  # not given: the preset decides
    ],
)
def test_check_range_bounds_nan_and_inf(value, lo, hi, lo_open, hi_open, ok):
    args = argparse.Namespace(x_y=value)
    if ok:
        check_range(args, "x_y", lo, hi, lo_open=lo_open, hi_open=hi_open)
    else:
        with pytest.raises(ConfigError, match=re.escape("--x-y must be in ")):
            check_range(args, "x_y", lo, hi, lo_open=lo_open, hi_open=hi_open)


def test_explicit_flags_win_over_the_preset():
    args = simclr.get_args_parser().parse_args(["--preset", "cpu", "--epochs", "7", "--width", "8"])
    args = apply_preset(args, simclr.PRESETS)
    assert (args.epochs, args.width) == (7, 8)
    assert args.batch_size == simclr.PRESETS["cpu"]["batch_size"]


def test_huge_seeds_are_reduced_below_2_63():
    args = apply_preset(simclr.get_args_parser().parse_args(["--preset", "tiny"]), simclr.PRESETS)
    args.seed = 2**64 + 5
    check_args(args, 1)
    assert args.seed == (2**64 + 5) % 2**63


def _exit_of(main, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        cli.run_cli(main, argparse.Namespace())
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "raised,code",
    [
        (ConfigError("--lr must be in [0, inf), got -1"), cli.EXIT_CONFIG),
        (FloatingPointError("non-finite loss at step 3"), cli.EXIT_NONFINITE),
        (OSError(28, "No space left on device", "runs/x/log.jsonl"), cli.EXIT_CONFIG),
    ],
)
def test_run_cli_maps_a_failure_to_one_line_and_its_exit_code(raised, code, capsys):
    def main(args):
        raise raised

    got, err = _exit_of(main, capsys)
    assert got == code
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_run_cli_exit_codes_of_success_preemption_and_a_bug(capsys):
    assert _exit_of(lambda a: {"top1": 1.0}, capsys)[0] == 0
    assert _exit_of(lambda a: {"stopped": "preempted"}, capsys)[0] == cli.EXIT_PREEMPTED

    def bug(args):
        raise KeyError("a bug is a traceback, not an error line")

    with pytest.raises(KeyError):
        cli.run_cli(bug, argparse.Namespace())
