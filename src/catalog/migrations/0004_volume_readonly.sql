-- cairn catalog schema v4: Block Storage's read-only flag (`os-update_readonly_flag`). A
-- read-only volume is exported read-only over NBD whatever its attachments ask for.
ALTER TABLE volumes ADD COLUMN readonly INTEGER NOT NULL DEFAULT 0 CHECK (readonly IN (0, 1));
