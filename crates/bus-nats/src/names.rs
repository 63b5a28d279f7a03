//! How bus names map onto JetStream names.
//!
//! | bus | JetStream |
//! |---|---|
//! | topic `orders.placed` | stream `SHOAL_orders_placed` (`<prefix>_SHOAL_…` with a prefix) |
//! | its partition 3 | subject `shoal.orders.placed.3` (`<prefix>.shoal.…`) |
//! | group `billing` on it, partition 3 | durable pull consumer `billing_p3` on the stream |
//! | a member of that group | key `orders/placed.billing.<member id>` in bucket `shoal_groups` |
//!
//! Stream and consumer names may not hold `.`, so `.` becomes `_`, and `a.b` and `a_b`
//! would share a name: the stream's and the consumer's descriptions record the real
//! topic and group, and a second name that maps onto a taken one is refused
//! (`Conflict`) instead of sharing it. Subjects and keys keep the names apart by
//! themselves (keys spell `.` as `/`, which names cannot hold).

/// The names of one bus instance (one prefix).
#[derive(Clone, Debug)]
pub(crate) struct Names {
    prefix: Option<String>,
}

impl Names {
    pub(crate) fn new(prefix: Option<String>) -> Self {
        Self { prefix }
    }

    pub(crate) fn stream(&self, topic: &str) -> String {
        let t = topic.replace('.', "_");
        match &self.prefix {
            Some(p) => format!("{p}_SHOAL_{t}"),
            None => format!("SHOAL_{t}"),
        }
    }

    fn subject_root(&self, topic: &str) -> String {
        match &self.prefix {
            Some(p) => format!("{p}.shoal.{topic}"),
            None => format!("shoal.{topic}"),
        }
    }

    pub(crate) fn subject(&self, topic: &str, partition: u32) -> String {
        format!("{}.{partition}", self.subject_root(topic))
    }

    /// The stream's subjects: every partition of the topic.
    pub(crate) fn subjects(&self, topic: &str) -> String {
        format!("{}.*", self.subject_root(topic))
    }

    pub(crate) fn bucket(&self) -> String {
        match &self.prefix {
            Some(p) => format!("{p}_shoal_groups"),
            None => "shoal_groups".to_string(),
        }
    }
}

/// The durable consumer of `group` for one partition.
pub(crate) fn consumer(group: &str, partition: u32) -> String {
    format!("{}_p{partition}", group.replace('.', "_"))
}

/// The key prefix of a group's leases (`topic.group`, with `.` inside names as `/`).
pub(crate) fn lease_prefix(topic: &str, group: &str) -> String {
    format!("{}.{}", topic.replace('.', "/"), group.replace('.', "/"))
}

/// What the stream's description says: the topic and its partition count, read back by
/// every publisher (JetStream 2.9 has no stream metadata).
pub(crate) fn topic_description(topic: &str, partitions: u32) -> String {
    format!("shoal-bus topic={topic} partitions={partitions}")
}

/// The topic and partition count from a stream's description; `None` when the stream
/// is not a bus topic.
pub(crate) fn parse_topic_description(description: &str) -> Option<(String, u32)> {
    let rest = description.strip_prefix("shoal-bus ")?;
    let mut topic = None;
    let mut partitions = None;
    for field in rest.split_whitespace() {
        if let Some(t) = field.strip_prefix("topic=") {
            topic = Some(t.to_string());
        } else if let Some(p) = field.strip_prefix("partitions=") {
            partitions = p.parse().ok();
        }
    }
    Some((topic?, partitions?))
}

/// What a group consumer's description says.
pub(crate) fn group_description(group: &str, partition: u32) -> String {
    format!("shoal-bus group={group} partition={partition}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_as_documented() {
        let n = Names::new(None);
        assert_eq!(n.stream("orders.placed"), "SHOAL_orders_placed");
        assert_eq!(n.subject("orders.placed", 3), "shoal.orders.placed.3");
        assert_eq!(n.subjects("orders.placed"), "shoal.orders.placed.*");
        assert_eq!(n.bucket(), "shoal_groups");
        let n = Names::new(Some("t1".into()));
        assert_eq!(n.stream("a-b"), "t1_SHOAL_a-b");
        assert_eq!(n.subject("a-b", 0), "t1.shoal.a-b.0");
        assert_eq!(n.bucket(), "t1_shoal_groups");
        assert_eq!(consumer("billing.v2", 7), "billing_v2_p7");
        assert_eq!(lease_prefix("a.b", "c.d"), "a/b.c/d");
        assert_ne!(lease_prefix("a.b", "c"), lease_prefix("a", "b.c"));
    }

    #[test]
    fn descriptions_round_trip() {
        let d = topic_description("orders.placed", 12);
        assert_eq!(
            parse_topic_description(&d),
            Some(("orders.placed".to_string(), 12))
        );
        assert_eq!(parse_topic_description("someone else's stream"), None);
        assert_eq!(parse_topic_description("shoal-bus topic=x"), None);
    }
}
