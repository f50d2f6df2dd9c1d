-- The consumers' tables, for services without Django (the `outboxd.django` migration makes
-- the same ones): the dedupe record of each handled event, and the events given up on.
CREATE TABLE IF NOT EXISTS outboxd_processed_event (
    id           bigserial PRIMARY KEY,
    consumer     varchar(200) NOT NULL,
    event_id     varchar(200) NOT NULL,
    processed_at timestamptz  NOT NULL,
    CONSTRAINT outboxd_processed_once UNIQUE (consumer, event_id)
);

CREATE TABLE IF NOT EXISTS outboxd_dead_letter (
    id         bigserial PRIMARY KEY,
    consumer   varchar(200) NOT NULL,
    event_id   varchar(200) NOT NULL,
    event_type varchar(200) NOT NULL,
    source     varchar(200) NOT NULL,
    position   varchar(100) NOT NULL,
    key        varchar(200) NOT NULL,
    payload    text         NOT NULL,
    headers    jsonb        NOT NULL,
    attempts   integer      NOT NULL CHECK (attempts >= 0),
    error      text         NOT NULL,
    failed_at  timestamptz  NOT NULL
);
