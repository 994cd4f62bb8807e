-- cairn catalog schema v1.
--
-- Conventions: ids are TEXT (UUIDs in canonical hyphenated lower case unless noted);
-- timestamps are TEXT in UTC, RFC 3339 with microseconds ('2026-11-23T15:22:47.123456Z');
-- free-form key/value data is TEXT holding a JSON object; booleans are INTEGER 0/1.
-- Store object ids reference objects of the chunk store (not a foreign key: another database).

CREATE TABLE projects (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    enabled     INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    created_at  TEXT NOT NULL
);

CREATE TABLE users (
    id                 TEXT PRIMARY KEY,
    name               TEXT NOT NULL UNIQUE,
    -- PHC string (e.g. argon2id); NULL means password login is disabled for this user.
    password_hash      TEXT,
    default_project_id TEXT REFERENCES projects(id) ON DELETE SET NULL,
    enabled            INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    created_at         TEXT NOT NULL
);

CREATE TABLE roles (
    id   TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);

CREATE TABLE role_assignments (
    user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    project_id TEXT NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    role_id    TEXT NOT NULL REFERENCES roles(id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, project_id, role_id)
);
CREATE INDEX role_assignments_project ON role_assignments(project_id);

CREATE TABLE tokens (
    -- Digest of the bearer token (hex SHA-256); the token itself is never stored.
    token_hash TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    project_id TEXT REFERENCES projects(id) ON DELETE CASCADE,
    audit_id   TEXT NOT NULL,
    methods    TEXT NOT NULL DEFAULT '["password"]',
    issued_at  TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    revoked    INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1))
);
CREATE INDEX tokens_expires ON tokens(expires_at);

CREATE TABLE images (
    id               TEXT PRIMARY KEY,
    -- Owning project; NULL for images owned by nobody (e.g. created by the operator).
    project_id       TEXT REFERENCES projects(id) ON DELETE RESTRICT,
    name             TEXT,
    status           TEXT NOT NULL,
    visibility       TEXT NOT NULL DEFAULT 'shared'
                     CHECK (visibility IN ('public', 'private', 'shared', 'community')),
    protected        INTEGER NOT NULL DEFAULT 0 CHECK (protected IN (0, 1)),
    os_hidden        INTEGER NOT NULL DEFAULT 0 CHECK (os_hidden IN (0, 1)),
    disk_format      TEXT,
    container_format TEXT,
    size_bytes       INTEGER CHECK (size_bytes >= 0),
    virtual_size     INTEGER CHECK (virtual_size >= 0),
    checksum         TEXT,
    os_hash_algo     TEXT,
    os_hash_value    TEXT,
    min_ram          INTEGER NOT NULL DEFAULT 0 CHECK (min_ram >= 0),
    min_disk         INTEGER NOT NULL DEFAULT 0 CHECK (min_disk >= 0),
    -- Store object holding the uploaded bytes as uploaded.
    data_object_id   TEXT UNIQUE,
    -- Store object holding the raw conversion (the raw cache), once made.
    raw_object_id    TEXT UNIQUE,
    raw_cache_status TEXT,
    raw_cache_error  TEXT,
    -- Extra properties: JSON object of string values.
    properties       TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(properties)),
    -- JSON array of strings.
    tags             TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(tags)),
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);
CREATE INDEX images_project ON images(project_id);

CREATE TABLE volumes (
    id                TEXT PRIMARY KEY,
    project_id        TEXT NOT NULL REFERENCES projects(id) ON DELETE RESTRICT,
    -- Creator (pdisk "owner"); NULL when created by the daemon itself.
    user_id           TEXT REFERENCES users(id) ON DELETE SET NULL,
    name              TEXT,
    description       TEXT,
    size_bytes        INTEGER NOT NULL CHECK (size_bytes >= 0),
    status            TEXT NOT NULL,
    -- Store object holding the volume's blocks; NULL until created in the store.
    object_id         TEXT UNIQUE,
    source_image_id   TEXT REFERENCES images(id) ON DELETE SET NULL,
    source_volume_id  TEXT REFERENCES volumes(id) ON DELETE SET NULL,
    volume_type       TEXT,
    availability_zone TEXT NOT NULL DEFAULT 'nova',
    bootable          INTEGER NOT NULL DEFAULT 0 CHECK (bootable IN (0, 1)),
    multiattach       INTEGER NOT NULL DEFAULT 0 CHECK (multiattach IN (0, 1)),
    -- pdisk: 'private' or 'public'.
    visibility        TEXT NOT NULL DEFAULT 'private' CHECK (visibility IN ('private', 'public')),
    -- pdisk: free-form tag.
    tag               TEXT,
    metadata          TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL
);
CREATE INDEX volumes_project ON volumes(project_id);

CREATE TABLE servers (
    id         TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id) ON DELETE RESTRICT,
    name       TEXT,
    -- pdisk identifies VMs by (node, vm_id); Compute by id.
    node       TEXT,
    vm_id      TEXT,
    status     TEXT NOT NULL DEFAULT 'ACTIVE',
    metadata   TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
    created_at TEXT NOT NULL,
    UNIQUE (node, vm_id)
);
CREATE INDEX servers_project ON servers(project_id);

CREATE TABLE attachments (
    id          TEXT PRIMARY KEY,
    volume_id   TEXT NOT NULL REFERENCES volumes(id) ON DELETE RESTRICT,
    server_id   TEXT NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
    -- Device path or target as the client sees it ('/dev/vdb', 'vda'), if known.
    device      TEXT,
    -- 'static' (attached at launch) or 'hot' (hot-plugged), per pdisk; Compute uses 'hot'.
    kind        TEXT NOT NULL DEFAULT 'hot' CHECK (kind IN ('static', 'hot')),
    mode        TEXT NOT NULL DEFAULT 'rw' CHECK (mode IN ('rw', 'ro')),
    attached_at TEXT NOT NULL,
    UNIQUE (volume_id, server_id)
);
CREATE INDEX attachments_server ON attachments(server_id);

CREATE TABLE filesystems (
    id          TEXT PRIMARY KEY,
    -- NULL for scope 'global'.
    project_id  TEXT REFERENCES projects(id) ON DELETE RESTRICT,
    name        TEXT NOT NULL,
    size_bytes  INTEGER NOT NULL CHECK (size_bytes >= 0),
    scope       TEXT NOT NULL CHECK (scope IN ('global', 'project', 'instance')),
    status      TEXT NOT NULL,
    -- Root of the filesystem's data in the store, once created.
    object_id   TEXT UNIQUE,
    metadata    TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
-- Names are unique per project, and globally among global filesystems.
CREATE UNIQUE INDEX filesystems_name ON filesystems(COALESCE(project_id, ''), name);

-- Which instances may see a filesystem (scope 'instance').
CREATE TABLE filesystem_instances (
    filesystem_id TEXT NOT NULL REFERENCES filesystems(id) ON DELETE CASCADE,
    server_id     TEXT NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
    created_at    TEXT NOT NULL,
    PRIMARY KEY (filesystem_id, server_id)
);
CREATE INDEX filesystem_instances_server ON filesystem_instances(server_id);
