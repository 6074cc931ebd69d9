-- When the storage provider slows a job down for a long while (Telegram's FLOOD_PREMIUM_WAIT
-- on a free account), what the progress message says about it: JSON of
-- storinator_shared::Throttle (reason, measured rate, recomputed ETA), NULL when not throttled.
ALTER TABLE jobs ADD COLUMN throttle TEXT;
