"""Floor 2: the tasks behind the commands, as plain functions of a composed config (or a folder)."""
