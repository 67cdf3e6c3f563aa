"""Process managers: long-running flows that watch several events and decide what happens next.

A process manager is declared in a tasks module (`bus.process_manager(...)`,
declaration.py); each of its steps runs inside the bus's ordinary executions, a
subscriber's or a command's (runtime.py), with its handler's third argument, `process`
(context.py); its state is stored with a version (project/store/process_state.py).
"""
