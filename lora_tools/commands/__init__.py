"""The commands' library functions, one module each, built from the layers below.

`merge`, `unmerge`, `extract`, `resize`, `combine`, `convert`, `inspect`, `check`, `diff`,
`push` (and `adapter_stats`, `collect_environment`): each module holds one command and only
the glue between its layers; the CLI calls these and renders what they return. Nothing
below this package imports it.
"""
