"""Stage services as real separate processes on loopback (see orchestrator.launcher)."""

from orchestrator.launcher import free_port, stage_process, stage_processes

__all__ = ["free_port", "stage_process", "stage_processes"]
