"""The `memtrace` command: bad flags are argparse errors (exit 2, a message naming the flag), not tracebacks."""
import pytest

from memtrace import cli


@pytest.mark.parametrize("argv,word", [
    (["parity", "--trials", "0"], "--trials"),
    (["parity", "--trials", "-1"], "--trials"),
    (["parity", "--seed", "-1"], "--seed"),
    (["parity", "--seed", str(2 ** 70)], "--seed"),
    (["parity", "--max-len", "0"], "--max-len"),
    (["parity", "--max-len", "-3"], "--max-len"),
    (["parity", "--max-len", "70000"], "--max-len"),
    (["parity", "--trials", "x"], "--trials"),
])
def test_bad_parity_flags_are_argparse_errors(argv, word, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert word in capsys.readouterr().err


def test_parity_rejects_unknown_backends(capsys):
    assert cli.main(["parity", "--trials", "1", "--backends", "reference,nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "reference" in err


def test_bench_rejects_a_json_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    assert cli.main(["bench", "--only", "routing", "--json-dir", str(path)]) == 2
    assert "--json-dir" in capsys.readouterr().err


def test_parity_comparing_nothing_is_an_error(capsys, monkeypatch):
    """Issue 28.6: `parity --backends cudnn` without cuDNN compared 0 cases, printed "all within
    SPEC 7 tolerances" and exited 0. Zero comparisons (in all, or for a backend named in
    --backends) must exit non-zero and say why."""
    from memtrace import attention as A

    def only_reference(*args, **kwargs):
        return ["reference"]

    monkeypatch.setattr(A, "available_backends", only_reference)
    assert cli.main(["parity", "--trials", "2", "--backends", "cudnn", "--max-len", "4"]) == 1
    captured = capsys.readouterr()
    assert "all within" not in captured.out
    assert "compared no case" in captured.err and "cudnn" in captured.err
    # one requested backend ran, one could not: still an error, naming the idle one
    assert cli.main(["parity", "--trials", "2", "--backends", "reference,cudnn", "--max-len", "4"]) == 1
    err = capsys.readouterr().err
    assert "compared no case for cudnn on" in err
    # the backends that run: a pass
    assert cli.main(["parity", "--trials", "2", "--backends", "reference", "--max-len", "4"]) == 0
