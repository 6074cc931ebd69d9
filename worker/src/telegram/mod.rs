//! Telegram storage on grammers (issue 3).
