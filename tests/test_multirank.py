"""Multi-rank tests: each launches `mpirun -np 4` on a program in tests/mpi/ with a timeout."""
import ast

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
    expect_passes(result, ["mgrawa_centre", "lgrawa_per_tensor_weights", "grawa_norm_edge_cases",
                           "grawa_equals_localsgd", "easgd_formula", "symmetry_trap", "comm_volume",
                           "checkpoint_round_trip", "bad_arguments"])


def test_every_method_trains_digits():
    methods = ["lsgd", "mgrawa", "lgrawa", "easgd", "localsgd", "dp"]
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
