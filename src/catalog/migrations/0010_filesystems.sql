-- cairn catalog schema v10: shared filesystems (seed 002's os-filesystem), on the tables of
-- v1: the size as the client wrote it ("4Gb"), echoed back as the seed shows it.
ALTER TABLE filesystems ADD COLUMN size_text TEXT;
