//! The pre-fork supervisor (issue 4): `fork_processes`, `task_id`, `Supervisor`.
