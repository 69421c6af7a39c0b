"""The use cases: what a client can ask of Shoal, one function each, shared by every front end.

The native routes (/v1), the dynamic-sessions routes, the batch coordinator and beat all call
these for what a client can ask (the coordinator and beat send only their own housekeeping
tasks: a batch's next coordinator, a host's replenish). Each use case reads and writes the
registry (Redis) and sends at most a few tasks (shoal/queue.py) to the queue of the session's
host; nothing here touches a VM.

- sessions.py    create, delete, expire a session; the session behind a dynamic-sessions identifier
- executions.py  submit, wait for, cancel an execution
- files.py       list, stat, delete, upload, download a session's files
- batches.py     submit and cancel a batch
- pools.py       what a pool's image holds
"""
