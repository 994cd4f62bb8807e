-- cairn catalog schema v7: an upload to an image (`os-volume_upload_image`) in progress: the
-- point-in-time copy it streams (a store object) and the image it fills. A restart resumes it.
ALTER TABLE volumes ADD COLUMN upload_copy TEXT;
ALTER TABLE volumes ADD COLUMN upload_image TEXT;
