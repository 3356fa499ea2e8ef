"""--cpus LIST: taskset's syntax, its errors, the thread count, and pinning this process."""
import contextlib
import os
import re
import threading

import pytest

from qwenvl_pd.cli import build_parser
from qwenvl_pd.cpus import check_cpus, format_cpus, parse_cpus, pin, split_roles, threads_for, union
from qwenvl_pd.serve import ServeConfig, _node_args


@pytest.mark.parametrize("spec, cpus", [
    ("0", (0,)), ("0-1", (0, 1)), ("3,1", (1, 3)), ("0,2-4", (0, 2, 3, 4)), (" 1 , 0 ", (0, 1)),
    ("0-7:2", (0, 2, 4, 6)), ("1-1", (1,)), ("2,0-2", (0, 1, 2)), ("10-12:5", (10,)),
])
def test_parse_cpus_reads_taskset_lists(spec, cpus):
    assert parse_cpus(spec) == cpus


@pytest.mark.parametrize("spec, why", [
    ("", "'' is not N, N-M or N-M:S"), ("0,", "'' is not N"), ("a", "'a' is not N"), ("-1", "'-1' is not N"),
    ("1-", "'1-' is not N"), ("0:2", "'0:2' is not N"), ("3-1", "range '3-1' runs backwards"),
    ("0-3:0", "stride in '0-3:0' must be a positive integer"), ("0-3:x", "stride in '0-3:x'"),
])
def test_parse_cpus_names_the_bad_item(spec, why):
    with pytest.raises(ValueError, match="^" + re.escape(f"CPU list {spec!r}: ") + ".*" + re.escape(why)):
        parse_cpus(spec)


def test_format_collapses_runs_and_parses_back():
    assert format_cpus((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8"
    assert format_cpus((3,)) == "3"
    assert parse_cpus(format_cpus((0, 1, 2, 5, 7, 8))) == (0, 1, 2, 5, 7, 8)
    assert union((1,), (0,), (1, 3)) == (0, 1, 3)


def test_threads_are_the_pinned_cores_shared_by_the_ranks():
    assert threads_for((), 0, 1) == 0          # not pinned: torch's default
    assert threads_for((0, 1, 2, 3), 0, 1) == 4
    assert threads_for((0, 1, 2, 3), 0, 2) == 2
    assert threads_for((0,), 0, 2) == 1         # never 0 threads
    assert threads_for((0, 1), 3, 1) == 3       # --threads wins


def test_a_core_this_process_may_not_use_is_refused():
    allowed = sorted(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match=f"core\\(s\\) {allowed[-1] + 1000} not available here "
                                         f"\\(this process may use {format_cpus(tuple(allowed))}\\)"):
        check_cpus((allowed[0], allowed[-1] + 1000))


def test_pin_moves_every_thread_already_running():
    before = os.sched_getaffinity(0)
    target = (min(before),)
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)  # started before the pin, as a library's pool
    worker.start()
    try:
        pin(target)
        for tid in (threading.get_native_id(), worker.native_id):  # others may end meanwhile
            with open(f"/proc/self/task/{tid}/status") as f:
                line = next(x for x in f if x.startswith("Cpus_allowed_list:"))
            assert line.split()[1] == str(target[0]), tid
        pin(())  # nothing given: left as it is
        assert os.sched_getaffinity(0) == set(target)
    finally:
        stop.set()
        worker.join()
        for tid in os.listdir("/proc/self/task"):  # back as it was
            with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
                os.sched_setaffinity(int(tid), before)


def test_cli_refuses_a_bad_list_by_flag(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--cpus-decode", "2-1"])
    assert e.value.code == 2
    assert "argument --cpus-decode: CPU list '2-1': range '2-1' runs backwards" in capsys.readouterr().err
    args = build_parser().parse_args(["decode", "--model", "m", "--cpus", "0"])
    assert args.cpus == (0,)


def test_serve_passes_each_role_its_cores_and_colocated_their_union():
    cpu = min(os.sched_getaffinity(0))
    cfg = ServeConfig(cpus_prefill=(cpu,), cpus_decode=(), cpus_proxy=(cpu,))
    args = _node_args(cfg, "prefill", "m", 1)
    assert args[args.index("--cpus") + 1] == str(cpu)
    assert "--cpus" not in _node_args(cfg, "decode", "m", 1)
    assert ServeConfig(cpus_prefill=(cpu,), cpus_decode=(cpu,)).cpus_colocated == (cpu,)
    with pytest.raises(ValueError, match="core\\(s\\) 100000 not available"):
        ServeConfig(cpus_decode=(100000,))


@pytest.mark.parametrize("cores, prefill, decode, proxy", [
    ((), (), (), ()), ((3,), (), (), ()),
    ((0, 1), (1,), (0,), (1,)),
    ((1, 0, 2), (1, 2), (0,), (1, 2)),
    ((0, 1, 2, 3), (2, 3), (0, 1), (2, 3)),
    ((4, 6, 8, 10, 12, 14), (10, 12, 14), (4, 6, 8), (10, 12, 14)),
])
def test_split_roles_gives_decode_the_first_half(cores, prefill, decode, proxy):
    assert split_roles(cores) == (prefill, decode, proxy)


def test_serve_pins_by_default_explicit_lists_win_and_no_pin_leaves_all():
    cores = tuple(sorted(os.sched_getaffinity(0)))
    prefill, decode, proxy = split_roles(cores)
    cfg = ServeConfig().pinned()
    assert (cfg.cpus_prefill, cfg.cpus_decode, cfg.cpus_proxy) == (prefill, decode, proxy)
    assert ServeConfig(pin=False).pinned() == ServeConfig(pin=False)
    assert ServeConfig(pin=False).layout() == "not pinned: every role on every core"
    given = ServeConfig(cpus_decode=cores[:1])
    assert given.pinned() == given
    assert given.layout() == f"prefill on cores all, decode on cores {cores[0]}, proxy on cores all"
    assert ServeConfig(cpus_decode=cores[:1], colocated=True).layout() == \
        f"the colocated engine and proxy on cores {cores[0]}"


def test_serve_no_pin_and_dtype_flags_reach_the_config():
    args = build_parser().parse_args(["serve", "--no-pin", "--dtype", "bfloat16"])
    assert (args.no_pin, args.dtype) == (True, "bfloat16")
    args = build_parser().parse_args(["serve"])
    assert (args.no_pin, args.dtype) == (False, "auto")
    node = _node_args(ServeConfig(dtype="bfloat16"), "decode", "m", 1)
    assert node[node.index("--dtype") + 1] == "bfloat16"
