"""`python -m vllm_sim [vLLM flags]`: see vllm_sim.cli."""

from vllm_sim.cli import main

raise SystemExit(main())
