"""The chat's wire vocabulary, with no I/O in it: line framing and its limits (``lines``),
user and room names (``names``), every text the server sends with its parser (``texts``),
the command table (``commands``) and the errors (``errors``).

The gateway, the client, the admin tool and the benchmark all speak through this package,
so a line is spelled in one place and parsed by the same rules everywhere.
"""
