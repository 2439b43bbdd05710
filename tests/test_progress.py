"""Progress in a log (output that is not a terminal): whole lines with the rate, never the
carriage-return frames of a terminal bar; short work leaves no line."""

import re

from mmcl.progress import progress


def test_a_log_gets_one_line_at_the_end_with_the_rate(capsys):
    for _ in progress(range(50), desc="data check", unit="images", total=50):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.fullmatch(r"data check: 50/50 images \[[\d:]+<[\d:]+, +[\d.?]+ ?(images/s|s/images)\]\n", err), err


def test_the_training_bar_prints_a_line_per_log_window(capsys):
    bar = progress(desc="train", unit="steps", total=4)
    for step in range(4):
        bar.update(1)
        bar.set_postfix({"loss": f"{1 / (step + 1):.3g}"})
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and all(line.startswith(f"train: {i}/4 steps") for i, line in enumerate(lines, 1))
    assert lines[-1].endswith(", loss=0.25]")


def test_short_work_leaves_no_line(capsys):
    for _ in progress(range(3), desc="embedding images", unit="batches", total=3, delay=60):
        pass
    assert capsys.readouterr().err == ""
