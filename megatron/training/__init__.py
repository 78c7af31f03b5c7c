"""Training: set-up (``setup``), the loop and evaluation (``loop``, ``training``), one pipeline step
(``forward_backward``), a run's checkpoint wiring (``resume``; the files themselves are
:mod:`megatron.checkpoint`'s), logging (``logging_utils``, ``metrics``, ``trackers``) and the SIGTERM
handler (``signal_handler``). The configuration sections a run takes are in ``megatron.config`` and
``megatron.run_config``; ``megatron.arguments.resolve`` builds them."""
