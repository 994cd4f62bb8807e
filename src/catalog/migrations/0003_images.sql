-- cairn catalog schema v3: images as the Image API needs them. The v1 table was never
-- written to; it is replaced (an image's owner is Glance's free string, not a reference,
-- and the raw cache keeps its state in columns the jobs can query).
DROP TABLE images;
CREATE TABLE images (
    id               TEXT PRIMARY KEY,
    -- Owning project (Glance's `owner`: any string an admin sets; NULL for nobody's).
    owner            TEXT,
    name             TEXT,
    status           TEXT NOT NULL
                     CHECK (status IN ('queued', 'saving', 'uploading', 'importing', 'active',
                                       'deactivated', 'killed', 'deleted', 'pending_delete')),
    visibility       TEXT NOT NULL DEFAULT 'shared'
                     CHECK (visibility IN ('public', 'private', 'shared', 'community')),
    protected        INTEGER NOT NULL DEFAULT 0 CHECK (protected IN (0, 1)),
    os_hidden        INTEGER NOT NULL DEFAULT 0 CHECK (os_hidden IN (0, 1)),
    disk_format      TEXT,
    container_format TEXT,
    -- Bytes of data (set when an upload or stage completes).
    size_bytes       INTEGER CHECK (size_bytes >= 0),
    virtual_size     INTEGER CHECK (virtual_size >= 0),
    checksum         TEXT,
    os_hash_algo     TEXT,
    os_hash_value    TEXT,
    min_ram          INTEGER NOT NULL DEFAULT 0 CHECK (min_ram >= 0),
    min_disk         INTEGER NOT NULL DEFAULT 0 CHECK (min_disk >= 0),
    -- Store object holding the data as uploaded; recorded before the object is created, so
    -- that a crash mid-upload leaves nothing the next start cannot find and delete.
    data_object_id   TEXT UNIQUE,
    -- What the format inspector found in the data (raw, qcow2, ...).
    detected_format  TEXT,
    -- The raw cache: its store object, state (Queued, Caching, Cached, Error), error text and
    -- allocated bytes. Shown as StarlingX's cache_raw_* properties.
    raw_object_id    TEXT UNIQUE,
    cache_status     TEXT CHECK (cache_status IN ('Queued', 'Caching', 'Cached', 'Error')),
    cache_error      TEXT,
    cache_size       INTEGER CHECK (cache_size >= 0),
    -- Extra properties set by clients: JSON object of string values.
    properties       TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(properties)),
    -- JSON array of strings.
    tags             TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(tags)),
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);
CREATE INDEX images_owner ON images(owner);
CREATE INDEX images_cache ON images(cache_status) WHERE cache_status IN ('Queued', 'Caching');

CREATE TABLE image_members (
    image_id   TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    member_id  TEXT NOT NULL,
    status     TEXT NOT NULL DEFAULT 'pending'
               CHECK (status IN ('pending', 'accepted', 'rejected')),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (image_id, member_id)
);
CREATE INDEX image_members_member ON image_members(member_id);
