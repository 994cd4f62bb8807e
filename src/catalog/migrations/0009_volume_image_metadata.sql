-- cairn catalog schema v9: Block Storage's `volume_image_metadata`: what a volume made from an
-- image recorded of it (cinder's volume_glance_metadata), kept when the image goes, and carried
-- to snapshots and to volumes cloned from them. A JSON object of strings; NULL: none.
ALTER TABLE volumes ADD COLUMN image_metadata TEXT
    CHECK (image_metadata IS NULL OR json_valid(image_metadata));
ALTER TABLE snapshots ADD COLUMN image_metadata TEXT
    CHECK (image_metadata IS NULL OR json_valid(image_metadata));
