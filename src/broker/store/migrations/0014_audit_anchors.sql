-- Seals of format 2 MAC their time as well as the tail, and the newest one is re-signed in
-- place every interval, so verification can tell a recent seal from one left behind when
-- newer seals were deleted. The seals already stored are format 1 (the tail only).
ALTER TABLE audit_seals ADD COLUMN format BIGINT NOT NULL DEFAULT 1;

-- Checkpoints are signed (HMAC under a key derived from a master key) over all their
-- fields and the time of the newest event they pruned; a checkpoint written in place of
-- events younger than the minimum retention, or without the master key, fails
-- verification. NULL on checkpoints from before this migration: those do not verify.
ALTER TABLE audit_checkpoints ADD COLUMN newest_pruned_at BIGINT;
ALTER TABLE audit_checkpoints ADD COLUMN kek_id TEXT;
ALTER TABLE audit_checkpoints ADD COLUMN mac TEXT;
