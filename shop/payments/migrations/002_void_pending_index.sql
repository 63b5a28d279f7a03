-- void_pending = 1: the payment is voided here and its void is still owed at the
-- provider (the void found it authorizing, or a late authorize could not void
-- what it got). The service's background retrier finds such rows, oldest write
-- first, every void_retry_ms; updated_ms grows with every write of void_pending.
CREATE INDEX payments_void_pending ON payments (void_pending, updated_ms);
