-- People who log in with a password (grant_type=password). `password_hash` is an
-- argon2id PHC string ($argon2id$v=19$m=…,t=…,p=…$salt$hash), never the password.
-- `scope` is what their tokens grant, space separated.
CREATE TABLE users (
    username      TEXT PRIMARY KEY NOT NULL,
    password_hash TEXT NOT NULL,
    scope         TEXT NOT NULL,
    created_ms    BIGINT NOT NULL
);

-- Machines that log in as themselves (grant_type=client_credentials).
CREATE TABLE clients (
    client_id   TEXT PRIMARY KEY NOT NULL,
    secret_hash TEXT NOT NULL,
    scope       TEXT NOT NULL,
    created_ms  BIGINT NOT NULL
);

-- Token signing keys. The one with no retire_after_ms signs; a replaced one keeps
-- being published until retire_after_ms (the last expiry of a token it signed, plus
-- a margin). pkcs8_der is the private key, base64: guard this table like a password.
CREATE TABLE signing_keys (
    kid             TEXT PRIMARY KEY NOT NULL,
    pkcs8_der       TEXT NOT NULL,
    created_ms      BIGINT NOT NULL,
    retire_after_ms BIGINT,
    revoked         BIGINT NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1))
);
