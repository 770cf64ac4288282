"""Multi-rank tests: each launches `mpirun -np 4` on a program in tests/mpi/ with a timeout."""
import ast

import pytest

from mpi_harness import expect_passes, run_mpi, values


def test_topology_groups_and_process_sets():
    result = run_mpi("topology_checks.py", timeout=180)
    expect_passes(result, ["membership", "group_broadcast", "bad_group_size", "env_group_size", "node_groups"])


def test_lsgd_rules():
    result = run_mpi("lsgd_checks.py", timeout=300)
    expect_passes(result, [
        "exact_pull_two_groups_fused", "exact_pull_one_group_fused",
        "exact_pull_two_groups_unfused", "exact_pull_one_group_unfused",
        "election_running_mean", "election_nan_inf_ties", "election_all_ranks_agree",
        "comm_bytes", "only_leader_parameters_travel",
        "fused_matches_unfused", "plain_sgd_momentum_fused", "adam_wrapped",
        "state_dict_round_trip", "bad_arguments",
    ])
    assert "rank 0 diverged" in result.stdout and "rank 1 diverged" in result.stdout  # the recovery is logged


def test_lsgd_training():
    result = run_mpi("lsgd_training_checks.py", timeout=400)
    expect_passes(result, ["symmetry_trap", "digits_convergence"])
    accuracy = float(values(result, "digits_leader_accuracy")[0].split()[0])
    assert accuracy >= 0.95


def test_grawa_and_baselines():
    result = run_mpi("averaging_checks.py", timeout=300)
    expect_passes(result, ["mgrawa_centre", "grawa_fresh_gradient_weights", "lgrawa_per_tensor_weights", "grawa_norm_edge_cases",
                           "grawa_equals_localsgd", "easgd_formula", "symmetry_trap", "comm_volume",
                           "checkpoint_round_trip", "bad_arguments"])


def test_every_method_trains_digits():
    methods = ["lsgd", "mgrawa", "lgrawa", "easgd", "localsgd", "dp", "diloco", "lsgd_int8"]
    result = run_mpi("digits_methods_checks.py", ",".join(methods), timeout=600)
    expect_passes(result, [f"digits_{m}" for m in methods])
    for m in methods:
        assert float(values(result, f"accuracy_{m}")[0]) >= 0.90


def test_asynchronous_variants():
    result = run_mpi("async_checks.py", timeout=400)
    expect_passes(result, ["fast_workers_run_ahead", "refreshes_at_scheduled_totals", "clean_shutdown_multi_group",
                           "async_digits_lsgd", "async_digits_grawa", "async_digits_easgd"])
    steps = ast.literal_eval(values(result, "async_steps")[0])  # [fast, fast, fast, slow] step counts
    assert min(steps[:3]) > steps[3]


def test_asynchronous_rounds_keep_pace_and_leader_is_not_pulled():
    result = run_mpi("async_rounds_checks.py", timeout=400)
    checks = [f"schedule_{kind}_p{period}_{speed}" for period in (1, 4) for kind in ("lsgd1", "lsgd2", "grawa")
              for speed in ("equal", "straggler")]
    checks += ["overlap_lsgd1", "overlap_grawa"]
    checks += [f"leader_follows_sgd_{mode}_{groups}group" for mode in ("sync", "async") for groups in (1, 2)]
    expect_passes(result, checks)


def test_unhealthy_workers_and_every_worker_diverged():
    result = run_mpi("divergence_checks.py", timeout=400)
    wrappers = [("lsgd1", True), ("lsgd2", True), ("grawa", True), ("easgd", True), ("localsgd", False)]
    modes = lambda has_async: ("sync", "async") if has_async else ("sync",)
    checks = [f"batchnorm_nan_{w}_{m}" for w, a in wrappers for m in modes(a)]
    checks += [f"all_diverged_{w}_{m}" for w, a in wrappers for m in modes(a)]
    checks += ["all_diverged_dp", "one_sided_easgd_centre_arithmetic", "one_sided_easgd_straggler"]
    expect_passes(result, checks)


def test_training_command_stops_on_every_rank_when_every_worker_diverges(tmp_path):
    """A learning rate that makes every worker diverge: the job exits non-zero, saying why, and
    within 30 s of the error (timed from the moment the message appears, not from start-up)."""
    import sys

    from mpi_harness import mpirun_command

    for algo in ("lsgd", "dp"):
        cmd = mpirun_command(4, [sys.executable, "-u", "-m", "horovod_leader.train", "--algo", algo, "--lr", "1e30",
                                 "--epochs", "30", "--eval-every", "1000", "--out", str(tmp_path / algo),
                                 "--no-progress"])
        status, after, output, seen = stream_until_exit(cmd, "every worker diverged at step")
        assert seen and status != 0, output[-3000:]
        assert after < 30, after


def stream_until_exit(cmd, marker: str, timeout: float = 180):
    """Run ``cmd``; return (exit status, seconds from the first line containing ``marker`` to
    the exit, output). Timing from the marker leaves Python's start-up out of it."""
    import subprocess
    import time

    from mpi_harness import REPO
    from test_cli import ENV

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO,
                            start_new_session=True)
    seen_at, lines, deadline = None, [], time.time() + timeout
    for line in proc.stdout:  # the pipe closes when every rank has exited
        lines.append(line)
        if seen_at is None and marker in line:
            seen_at = time.time()
        if time.time() > deadline:
            proc.kill()
            break
    status = proc.wait(timeout=30)
    return status, time.time() - (seen_at or time.time()), "".join(lines), seen_at is not None


@pytest.mark.horovod
def test_one_rank_raising_ends_the_job():
    """Rank 2 raises inside ``with opt:`` or outside it: every rank ends, non-zero, within 60 s."""
    import sys

    from mpi_harness import MPI_DIR, mpirun_command

    for algo in ("lsgd", "localsgd"):
        for where in ("inside", "outside"):
            cmd = mpirun_command(4, [sys.executable, "-u", str(MPI_DIR / "raise_checks.py"), algo, where])
            status, after, output, seen = stream_until_exit(cmd, "user code failed on rank 2")
            assert seen and status != 0, (algo, where, output[-3000:])
            assert after < 60, (algo, where, after)
            assert "finished all its steps" not in output, (algo, where, output[-3000:])
            assert "rank 2 failed; ending the whole job" in output, output[-3000:]


def test_uneven_steps_and_dataparallel_habits():
    result = run_mpi("training_loop_checks.py", timeout=400)
    expect_passes(result, [f"uneven_{m}" for m in ("lsgd1", "lsgd2", "grawa", "easgd", "localsgd", "dp")]
                  + ["localsgd_uneven_average_is_over_stepping_ranks", "dp_clip_skip_synchronize", "dp_uneven_average",
                     "fused_step_hooks_and_scheduler", "fused_per_group_weight_decay_and_frozen",
                     "errors_and_inputs"])


def test_diloco_and_compression():
    result = run_mpi("compression_checks.py", timeout=400)
    wrappers = ["lsgd1", "lsgd2", "lsgd1_async", "mgrawa", "lgrawa", "grawa_async", "easgd", "localsgd", "diloco"]
    expect_passes(result, ["diloco_outer_step", "diloco_state_dict_resumes", "compression_bytes",
                           "compression_copy_precision"] + [f"compression_every_wrapper_{w}" for w in wrappers])


def test_hvd_init_first():
    """``hvd.init()`` before horovod_leader and mpi4py are imported: then ``hl.init(group_size=2)``,
    or nothing but HOROVOD_LEADER_GROUP_SIZE=2; multi-leader LSGD trains in both."""
    for mode in ("then_init", "alone"):
        result = run_mpi("hvd_first_checks.py", mode, timeout=180, env={"HOROVOD_LEADER_GROUP_SIZE": "2"})
        expect_passes(result, [f"hvd_first_{mode}"])


def test_eight_kinds_of_input_under_every_wrapper():
    """Non-floating tensors, -inf masks, float16 models, models changed after wrapping, sparse
    gradients, broadcasting a fresh optimizer's state, checkpoints from another world, and
    ranks that disagree on the settings (tests/mpi/input_kinds_checks.py)."""
    wrappers = ["lsgd1", "lsgd2", "lsgd2_async", "lsgd2_int8", "mgrawa", "lgrawa", "mgrawa_async", "mgrawa_bf16",
                "easgd", "easgd_async", "easgd_onesided", "localsgd", "localsgd_int8", "diloco", "dp"]
    checks = [f"{kind}_{w}" for kind in ("nonfloat", "inf_mask", "changed", "changed_model", "sparse",
                                         "broadcast_state_fresh") for w in wrappers]
    checks += ["inf_mask_world_of_one"] + [f"inf_mask_became_nan_{w}" for w in ("localsgd", "mgrawa", "lsgd1")]
    checks += [f"half_{w}" for w in ("mgrawa", "lgrawa", "localsgd", "easgd", "diloco")] + ["half_lsgd_trains"]
    checks += ["changed_requires_grad_dp", "changed_requires_grad_followed_lsgd"]
    checks += ["sparse_dp_equals_dense", "sparse_dp_nan_values", "broadcast_state_from_root"]
    checks += [f"world_other_groups_{w}" for w in ("lsgd2_async", "lsgd2")]
    checks += [f"world_two_ranks_{w}" for w in ("lsgd2_async", "lsgd2", "easgd_onesided")]
    checks += [f"world_two_ranks_resumes_{w}" for w in ("localsgd", "mgrawa", "diloco", "easgd")]
    checks += [f"disagree_{w}" for w in wrappers if w not in ("lgrawa", "mgrawa_bf16")]
    result = run_mpi("input_kinds_checks.py", timeout=300)
    expect_passes(result, checks)


def test_wrapper_contract_and_registry():
    """Every wrapper's state_dict round-trips keyed by buffer name, foreign ones are refused
    clearly, and the registry builds every method (tests/mpi/contract_checks.py)."""
    wrappers = ["lsgd", "lsgd_async", "lsgd_int8", "grawa", "grawa_bf16", "easgd", "easgd_async", "easgd_onesided",
                "localsgd_int8", "diloco", "dp"]
    result = run_mpi("contract_checks.py", timeout=300)
    expect_passes(result, ["contract_signatures", *[f"round_trip_{w}" for w in wrappers], "foreign_state_dicts",
                           "registry_builds_every_method"])


def test_overlapped_rounds_and_node_aware_exchanges():
    """Overlapped rounds against hand computations and resumed mid-round; node-aware averages
    against flat ones; LSGD's node-aware broadcast (tests/mpi/overlap_checks.py)."""
    methods = ["localsgd", "easgd", "grawa", "diloco", "lsgd"]
    checks = [f"overlap_d{d}_{m}" for d in (0, 2) for m in methods] + [f"resume_mid_round_{m}" for m in methods]
    checks += ["overlap_is_refused_where_it_cannot_be"]
    checks += [f"node_average_equals_flat_{m}" for m in ("localsgd", "mgrawa", "lgrawa", "easgd", "diloco")]
    checks += ["node_compressed_bf16", "node_compressed_int8", "lsgd_node_broadcast_exact"]
    overlapped = ("localsgd", "mgrawa", "easgd", "diloco", "lsgd")
    checks += [f"overlap_node_aware_buffers_{m}" for m in overlapped] + [f"overlap_uneven_close_{m}" for m in overlapped]
    result = run_mpi("overlap_checks.py", timeout=300)
    expect_passes(result, checks)
