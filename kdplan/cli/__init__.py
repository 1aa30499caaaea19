"""The command line: one file per command, each parsing, calling one library function, rendering."""
