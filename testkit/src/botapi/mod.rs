//! Fake Bot API server (issue 4).
