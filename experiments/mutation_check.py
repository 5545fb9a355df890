"""Do the tests catch the bugs they are meant to catch? Break the code on purpose and see.

Each mutation below is a plausible bug, applied by text replacement to a
temporary copy of the package; the named tests then run against that copy
and must fail. The clean code must pass the same tests. Results go to
``experiments/results/mutations.json``::

    python experiments/mutation_check.py            # all mutations (about 20 minutes on 2 cores)
    python experiments/mutation_check.py --only parity_mislabelled
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name: (file, original text, mutated text, tests that must fail)
MUTATIONS = {
    "grouped_paths_out_of_order": (
        "equijax/layers.py",
        "            x = jnp.concatenate(blocks, axis=1)\n",
        "            x = jnp.concatenate(blocks[::-1], axis=1)\n",
        ["tests/test_options.py::test_grouped_message_passing_equals_the_uniform_one"],
    ),
    "w3j_signs_ignored": (
        "equijax/imports/sevennet.py",
        "        radial[-1] = radial[-1] * path_signs(sd, t, x_in, irreps_sh, x_out)\n",
        "        radial[-1] = radial[-1] * 1.0\n",
        ["tests/test_imports.py::test_float64_equals_sevenn_in_float64"],
    ),
    "torch_pickle_runs_os": (
        "equijax/imports/torchzip.py",
        "        if (module, name) in _ALLOWED:\n",
        "        if module in ('posix', 'os'):\n            import os\n            return getattr(os, name)\n"
        "        if (module, name) in _ALLOWED:\n",
        ["tests/test_imports.py::test_a_checkpoint_that_names_code_is_refused_and_runs_nothing"],
    ),
    "model_file_shapes_unchecked": (
        "equijax/checkpoint.py",
        "        if array.shape != tuple(want.shape):",
        "        if False:  # BUG: a parameter of a wrong (broadcastable) shape is used as it is",
        ["tests/test_checkpoint.py::test_damaged_model_files_are_refused_naming_the_file_and_the_parameter"],
    ),
    "md_appends_without_the_atomic_step": (
        "equijax/md/output.py",
        "        self.lengths = [_append(p, t) for p, t in zip(self.paths, [t.getvalue() for t in texts] + [log])]",
        "        [open(p, \"a\").write(t) for p, t in zip(self.paths, [t.getvalue() for t in texts] + [log])]"
        "  # BUG: appended as it comes, the committed lengths never move",
        ["tests/test_md_resume.py::test_a_run_killed_between_chunks_or_inside_an_append_resumes_exactly"],
    ),
    "energy_outliers_unchecked": (
        "equijax/loader/checks.py",
        "        far = np.abs(residual - centre) > limits.energy_mads * mad",
        "        far = np.zeros(len(residual), bool)  # BUG: absurd energies are trained on",
        ["tests/test_data_checks.py::test_an_absurd_energy_or_a_too_close_pair_stops_the_run_naming_file_frame_and_value"],
    ),
    "run_folders_not_compared": (
        "equijax/training/run.py",
        "    check_shared_folder(output)  # several processes: one folder, or one line in every process",
        "    pass  # BUG: processes with their own folders train on",
        ["tests/test_distributed.py::test_a_run_folder_per_process_is_refused_at_start_up_in_one_line"],
    ),
    "budget_pack_ignores_edges": (
        "equijax/loader/batching.py",
        "if nodes + a[k] > budget.nodes or edges + e[k] > budget.edges or k - start == budget.graphs:",
        "if nodes + a[k] > budget.nodes or k - start == budget.graphs:  # BUG: the edge budget is not checked",
        ["tests/test_loader.py::test_budget_plan_stays_within_budget_and_covers_every_structure_once"],
    ),
    "budget_plan_drops_the_last_shard": (
        "equijax/loader/batching.py",
        "    if start < len(order):\n        shards.append(order[start:])",
        "    pass  # BUG: the last, partly filled shard is lost",
        ["tests/test_loader.py::test_budget_plan_stays_within_budget_and_covers_every_structure_once"],
    ),
    "lazy_cache_keyed_by_position_in_subset": (
        "equijax/loader/sources.py",
        "        return self.source[int(self.indices[_checked(k, len(self))])]",
        "        return self.source[int(k)]  # BUG: a view reads the k-th frame of the file, not its k-th index",
        ["tests/test_loader.py::test_lazy_reading_larger_than_the_cache_gives_the_same_batches"],
    ),
    "resume_assumes_equal_epochs": (
        "equijax/training/run.py",
        "    while skip >= len(plan):",
        "    epoch, skip = divmod(step, steps_per_epoch)  # BUG: budget epochs differ in length\n"
        "    plan = epoch_plan(epoch)\n    while skip >= len(plan):",
        ["tests/test_loader.py::test_budget_batched_lazy_run_resumes_exactly_after_a_kill"],
    ),
    "hessian_directions_by_shard_position": (
        "equijax/training/losses.py",
        'structure = graph.globals.get("index", jnp.arange(graph.n_node.shape[0]))[graph_of_node]',
        "structure = graph_of_node  # BUG: directions follow the position in the shard, not the structure",
        ["tests/test_training.py::test_sharded_training_matches_single_device_on_uneven_shards"],
    ),
    "reference_hvp_without_structure_offsets": (
        "equijax/modes.py",
        "first = (jnp.cumsum(graph.n_node) - graph.n_node)[graph_of_node]",
        "first = jnp.zeros_like(graph_of_node)  # BUG: columns index the batch, not the node's structure",
        ["tests/test_hessian_training.py::test_loss_is_zero_on_the_models_own_hessians_and_blind_to_padding"],
    ),
    "reference_hvp_reads_past_its_structure": (
        "equijax/modes.py",
        "vj = jnp.where(valid[None, :, :, None], v[:, jnp.clip(columns, 0, n - 1)], 0.0)",
        "vj = v[:, jnp.clip(columns, 0, n - 1)]  # BUG: columns beyond the structure's atoms are used",
        ["tests/test_hessian_training.py::test_loss_is_zero_on_the_models_own_hessians_and_blind_to_padding"],
    ),
    "fd_hessian_over_delta": (
        "equijax/vibrations.py",
        "h[:, :, a, i] = -(forces[0] - forces[1]) / (2 * delta)",
        "h[:, :, a, i] = -(forces[0] - forces[1]) / delta  # BUG: central difference over one step",
        ["tests/test_hessian_training.py::test_reference_hessian_is_ases_finite_difference_hessian"],
    ),
    "normal_mode_samples_not_mass_weighted": (
        "equijax/vibrations.py",
        "sample.positions = atoms.positions + (inv_sqrt_m * (vectors @ q)).reshape(n, 3)",
        "sample.positions = atoms.positions + (vectors @ q).reshape(n, 3)  # BUG: mass-weighted amplitudes as Å",
        ["tests/test_hessian_training.py::test_normal_mode_samples_have_the_harmonic_thermal_energy"],
    ),
    "finetune_ignores_init": (
        "equijax/training/setup.py",
        "        return init_state(start_params, run.opt)",
        "        return init_state(initial_params(run.model, jax.random.PRNGKey(t.seed)), run.opt)  # BUG: fresh start",
        ["tests/test_hessian_training.py::test_finetune_starts_from_the_given_model"],
    ),
    "parity_mislabelled": (
        "equijax/models/nequip.py",
        "irreps_sh = e3nn.Irreps.spherical_harmonics(config.l_max)  # 0e + 1o + 2e + ...",
        "irreps_sh = e3nn.Irreps([(1, (l, 1)) for l in range(config.l_max + 1)])  # BUG: all even",
        ["tests/test_model.py::test_equivariance_molecule",
         "tests/test_vibrations.py::test_frequencies_invariant_under_rotation_with_inversion"],
    ),
    "strain_skips_the_cell": (
        "equijax/physics.py",
        'cell = cell + jnp.einsum("gik,gkj->gij", cell, eps.astype(cell.dtype))',
        "cell = cell  # BUG: the cell is not strained",
        ["tests/test_model.py::test_stress_matches_finite_differences_of_the_cell"],
    ),
    "strain_of_graph_0_for_all": (
        "equijax/physics.py",
        "node_eps = eps[graph_lib.node_graph_index(graph)]",
        "node_eps = jnp.broadcast_to(eps[0], (pos.shape[0], 3, 3))  # BUG: graph 0's strain everywhere",
        ["tests/test_model.py::test_batched_stress_equals_stress_of_each_structure"],
    ),
    "mean_of_shard_means": (
        "equijax/training/losses.py",
        "    return jax.tree_util.tree_map(lambda x: x.sum(0), per_shard)",
        "    per = {'energy': 'n_graphs', 'forces': 'n_force', 'stress': 'n_stress', 'dipole': 'n_dipole', 'hessian': 'n_hessian'}\n"
        "    count = lambda k: per_shard[per[k.split('_')[0]]]\n"
        "    # BUG: a mean of per-shard means (every shard weighs the same, whatever its size)\n"
        "    return {k: v.sum(0) if k.startswith('n_') else (v / jnp.maximum(count(k), 1)).mean(0) * count(k).sum(0)\n"
        "            for k, v in per_shard.items()}",
        ["tests/test_training.py::test_sharded_training_matches_single_device_on_uneven_shards"],
    ),
    "unknown_element_clipped": (
        "equijax/models/potential.py",
        "    return jnp.where(inside, jnp.asarray(table)[jnp.clip(z, 0, len(table) - 1)], -1)",
        "    return jnp.maximum(jnp.asarray(table)[jnp.clip(z, 0, len(table) - 1)], 0)  # BUG: unknown -> species 0",
        ["tests/test_model.py::test_unknown_elements_are_never_remapped"],
    ),
    "pickle_loading": (
        "equijax/checkpoint.py",
        "        with np.load(path, allow_pickle=False) as z:",
        "        import pickle  # BUG: trusts the file\n"
        "        if head[:1] == b'\\x80':\n"
        "            return 'equijax-model', pickle.loads(path.read_bytes())\n"
        "        with np.load(path, allow_pickle=True) as z:",
        ["tests/test_checkpoint.py::test_crafted_model_files_are_refused_and_run_no_code"],
    ),
    "random_readout_start": (
        "equijax/training/step.py",
        '    readout = dict(params["readout"], out=jax.tree_util.tree_map(jnp.zeros_like, params["readout"]["out"]))',
        '    readout = params["readout"]  # BUG: the random readout stays',
        ["tests/test_energy_reference.py::test_training_starts_from_the_reference_energies"],
    ),
    "independent_buckets": (
        "equijax/calculator.py",
        "        self.capacity = graph_lib.grow_capacity(self.capacity, (len(s.positions), len(nl[0]), 1))",
        "        self.capacity = graph_lib.pad_sizes(len(s.positions), len(nl[0]), 1)  # BUG: per-structure buckets",
        ["tests/test_calculator.py::test_a_stream_of_varied_structures_compiles_a_few_times"],
    ),
    "md_images_skip_own_atom": (
        "equijax/md/neighbours.py",
        "    itself = (jnp.arange(n)[:, None] == jnp.arange(n)[None, :])[:, :, None] & (jnp.arange(image.shape[0]) == 0)",
        "    itself = (jnp.arange(n)[:, None] == jnp.arange(n)[None, :])[:, :, None]  # BUG: no own images",
        ["tests/test_md.py::test_neighbour_list_equals_vesin_and_stays_exact_within_the_skin"],
    ),
    "md_langevin_noise_too_weak": (
        "equijax/md/integrators.py",
        "    p = c1 * state.momenta + jnp.sqrt((1.0 - c1 ** 2) * kT * state.mass)[:, None] * noise",
        "    p = c1 * state.momenta + jnp.sqrt((1.0 - c1) * kT * state.mass)[:, None] * noise  # BUG: 1 - c1",
        ["tests/test_md.py::test_langevin_reaches_the_target_temperature"],
    ),
    "md_overflow_not_replayed": (
        "equijax/md/run.py",
        "        if np.any(np.asarray(new_nbrs.overflow)):",
        "        if False:  # BUG: an overflowing list is used as it is",
        ["tests/test_md.py::test_overflow_is_recovered_without_losing_a_step"],
    ),
    "ensemble_ignores_stopped_members": (
        "equijax/training/step.py",
        "        return jax.tree_util.tree_map(lambda n, o: jnp.where(active, n, o), new, state), metrics",
        "        return new, metrics  # BUG: a member that stopped early keeps training",
        ["tests/test_ensemble.py::test_an_ensemble_step_equals_single_steps_and_freezes_stopped_members"],
    ),
    "committee_sums_members": (
        "equijax/ensemble.py",
        "        return lambda params, graph: jnp.mean(mapped(params, graph), axis=0)",
        "        return lambda params, graph: jnp.sum(mapped(params, graph), axis=0)  # BUG: sum, not mean",
        ["tests/test_ensemble.py::test_a_committee_is_the_mean_and_identical_members_have_no_spread"],
    ),
    "ensemble_members_share_a_seed": (
        "equijax/training/setup.py",
        "initial_params(run.model, jax.random.PRNGKey(t.seed + k))",
        "initial_params(run.model, jax.random.PRNGKey(t.seed + 0 * k))",  # BUG: every member starts the same
        ["tests/test_ensemble.py::test_an_ensemble_run_resumes_exactly_and_its_members_differ"],
    ),
    "ensemble_resume_forgets_best_members": (
        "equijax/training/run.py",
        "    if resumed is None:\n        return None",
        "    if True:  # BUG: a resume forgets the best parameters found before the kill\n        return None",
        ["tests/test_ensemble.py::test_an_ensemble_run_resumes_exactly_and_its_members_differ"],
    ),
    "every_process_writes_checkpoints": (
        "equijax/training/report.py",
        "        if self.lead:  # the state is replicated, so process 0 holds all of it",
        "        if True:  # BUG: every process writes the checkpoint",
        ["tests/test_distributed.py::test_two_processes_train_as_one_and_resume_across_processes"],
    ),
    "distributed_env_ignored": (
        "equijax/runtime/distributed.py",
        '    for name, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id"),\n'
        '                      ("EQUIJAX_HEARTBEAT_TIMEOUT", "heartbeat_timeout_seconds")):',
        '    for name, key in ():  # BUG: only JAX reads the environment (the documented launch fails)',
        ["tests/test_distributed.py::test_two_processes_train_as_one_and_resume_across_processes"],
    ),
    "cue_coefficients_off_for_l2_harmonics": (
        "equijax/kernels/cue.py",
        '            d.add_path(None, i_in, i_sh, None, c=coefficients, dims={"u": channels})',
        '            d.add_path(None, i_in, i_sh, None, c=coefficients * (1.001 if i_sh == 2 else 1.0),'
        ' dims={"u": channels})  # BUG',
        ["tests/test_kernels.py::test_backends_give_the_same_energies_forces_stress_hessians_and_gradients"],
    ),
    "cue_paths_permuted": (
        "equijax/kernels/cue.py",
        "    paths = iter(e3nn.Irreps(irreps_tp))",
        "    paths = iter(e3nn.Irreps(irreps_tp).sort().irreps)  # BUG: path order of a sorted irreps",
        ["tests/test_kernels.py::test_backends_give_the_same_energies_forces_stress_hessians_and_gradients"],
    ),
    "couple_jvp_drops_harmonics_term": (
        "equijax/kernels/segment.py",
        'return couple(a, x), jnp.einsum("ejk,ejc->ekc", da, x) + jnp.einsum("ejk,ejc->ekc", a, dx)',
        'return couple(a, x), jnp.einsum("ejk,ejc->ekc", a, dx)  # BUG: the harmonics\' tangent is lost',
        ["tests/test_kernels.py::test_backends_give_the_same_energies_forces_stress_hessians_and_gradients"],
    ),
    "console_does_not_restart_with_huge_pages": (
        "equijax/hugepages.py",
        '        os.execve(sys.executable, [sys.executable, "-m", "equijax.cli", *argv], env)',
        '        return  # BUG: announced, but the process goes on without the tunable',
        ["tests/test_cli.py::test_console_restarts_once_with_huge_pages"],
    ),
    "grouped_mixing_reorders_paths": (
        "equijax/layers.py",
        "        by_ir.setdefault(ir, []).append(np.arange(sl.start, sl.stop))",
        "        by_ir.setdefault(ir, []).insert(0, np.arange(sl.start, sl.stop))  # BUG: paths meet other weights",
        ["tests/test_model.py::test_mixing_of_summed_messages_keeps_the_parameter_layout"],
    ),
    "frequency_basis_keeps_eigh_order": (
        "equijax/modes.py",
        "    order = xp.argsort(xp.where(vibration, lam, xp.finfo(lam.dtype).max))  # no inf: tests trap them",
        "    order = xp.argsort(lam)  # BUG: rigid and padding zeros sort among the modes",
        ["tests/test_hessian_training.py::test_frequency_metric_reads_as_harmonic_frequency_errors"],
    ),
    "frequency_basis_wrong_power": (
        "equijax/modes.py",
        "    return rows * jnp.sqrt(WAVENUMBER / 2) * lam**-0.25",
        "    return rows * jnp.sqrt(WAVENUMBER / 2) * lam**-0.5  # BUG: relative, not frequency, errors",
        ["tests/test_hessian_training.py::test_frequency_metric_reads_as_harmonic_frequency_errors"],
    ),
    "newton_step_without_masses": (
        "equijax/modes.py",
        "    basis = modes / jnp.repeat(jnp.sqrt(mass), 3, axis=1)[:, :, None] * w[:, :, None]  # (n_graph, 3W, 3W modes)",
        "    basis = modes * w[:, :, None]  # BUG: mass-weighted modes used as Cartesian ones",
        ["tests/test_hessian_training.py::test_newton_step_inverts_the_reference_hessian"],
    ),
}


def run_tests(tree: Path, tests) -> tuple[bool, float, str]:
    env = dict(os.environ, PYTHONPATH=str(tree))  # the copy shadows the installed package
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=tree, env=env, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    return proc.returncode == 0, time.time() - t0, tail


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(MUTATIONS), help="run these mutations only")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "mutations.json")
    args = parser.parse_args(argv)
    results = {}
    for name in args.only or MUTATIONS:
        path, original, mutated, tests = MUTATIONS[name]
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "repo"
            shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", ".whl", "runs", "__pycache__"))
            source = (tree / path).read_text()
            if source.count(original) != 1:
                raise SystemExit(f"{name}: the text to mutate is not found once in {path}; update this script")
            clean_ok, clean_s, clean_tail = run_tests(tree, tests)
            (tree / path).write_text(source.replace(original, mutated))
            mutant_ok, mutant_s, mutant_tail = run_tests(tree, tests)
        caught = clean_ok and not mutant_ok
        results[name] = {"file": path, "tests": tests, "clean_passes": clean_ok, "mutant_fails": not mutant_ok,
                         "caught": caught, "clean": clean_tail, "mutant": mutant_tail,
                         "seconds": round(clean_s + mutant_s, 1)}
        print(f"{name:28s} {'CAUGHT' if caught else 'MISSED'}   clean: {clean_tail}   mutant: {mutant_tail}",
              flush=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() and args.only else {}
    args.out.write_text(json.dumps({**previous, **results}, indent=1) + "\n")
    print(f"{sum(r['caught'] for r in results.values())}/{len(results)} caught; {args.out}")
    if not all(r["caught"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
