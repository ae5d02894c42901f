"""The foundation: errors, byte units, the one reader of users' files, the one output channel."""
