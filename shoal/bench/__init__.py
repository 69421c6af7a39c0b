"""`shoal bench`: every performance figure of docs/performance.md from one command.

Layout: `runner` (the command: target instance, scenario selection, progress), `target` (a
running Shoal given by URL, or a private one started like the integration tests do), one
module per scenario family (`executions`, `sessions`, `vms`, `files`, `density`), `peers`
(what users would run instead, measured in the same run), `stats` (percentiles) and `report`
(the table, the JSON file and the plots). A scenario is a `Scenario` in its module's
`SCENARIOS` list: a function from the `Bench` context to a list of `Result`s.
"""
