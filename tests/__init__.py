"""fsdptrain test suite (a package, so test modules import their helpers as tests.helpers)."""
