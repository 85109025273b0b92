"""Entry of a DualParal worker process, run by multiprocessing's spawn through runpy.run_path.

The pack's own module name (ComfyUI names it after its folder path) cannot be imported in a fresh
process, so the worker loads `core` by path under a fixed name. Before anything of the host is
imported it sets the environment (CUDA_VISIBLE_DEVICES) and the host's settings (ComfyUI's command
line arguments, which pick the attention kernel at import; `core` imports nothing of the host), then
takes its payload from INBOX.
Globals given by the parent: RANK, CORE_DIR, ENVIRONMENT, HOST_SETUP, INBOX, OUTBOX. A failure
before the rank runs is reported too, so the parent never waits for a worker that is gone.
"""
import importlib
import importlib.util
import os
import sys

try:
    os.environ.update(ENVIRONMENT)  # noqa: F821
    PACKAGE = "streamline_worker_core"
    spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(CORE_DIR, "__init__.py"),  # noqa: F821
                                                  submodule_search_locations=[CORE_DIR])  # noqa: F821
    sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[PACKAGE])
    worker = importlib.import_module(f"{PACKAGE}.dualparal.worker")
    worker.apply_host_setup(HOST_SETUP)  # noqa: F821
except BaseException as error:
    OUTBOX.put(("error", RANK, f"worker start-up failed: {type(error).__name__}: {error}"))  # noqa: F821
    raise
worker.serve(INBOX, OUTBOX, RANK)  # noqa: F821
