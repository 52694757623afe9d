"""What every command line of the project shares to fail safely: refusing untrusted pickles (:mod:`.safe_load`),
exclusive output locks (:mod:`.locks`), durable renames and temporary-file clean-up (:mod:`.fs`), and one-line
errors with exit status 2, printed once under torchrun (:mod:`.errors`). See docs/security.md."""
