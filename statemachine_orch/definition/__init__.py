"""What a machine is: states, guards, the transition table, templates, validation and loading.

Pure definitions: nothing here runs a step, calls a model or touches a store.
"""
