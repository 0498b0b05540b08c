//! Per-route access policy: which identities may reach which targets. Deny by default.

use crate::config::PolicyConfig;

#[derive(Debug, Clone, Default)]
pub struct Policy {
    cfg: PolicyConfig,
}

impl Policy {
    pub fn new(cfg: PolicyConfig) -> Self {
        Self { cfg }
    }

    fn names(&self, identity: &str, pattern: &str) -> bool {
        if pattern == "*" || pattern == identity {
            return true;
        }
        pattern
            .strip_prefix("group:")
            .and_then(|g| self.cfg.groups.get(g))
            .is_some_and(|members| members.iter().any(|m| m == identity))
    }

    /// May `identity` open tunnels to `target`?
    pub fn allows(&self, identity: &str, target: &str) -> bool {
        self.is_admin(identity)
            || self.cfg.rules.iter().any(|r| {
                r.identities.iter().any(|p| self.names(identity, p))
                    && r.targets.iter().any(|t| t == "*" || t == target)
            })
    }

    pub fn is_admin(&self, identity: &str) -> bool {
        self.cfg.admins.iter().any(|a| self.names(identity, a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicyRule;

    #[test]
    fn deny_by_default_and_groups() {
        let p = Policy::new(PolicyConfig {
            admins: vec!["root".into()],
            groups: [("dev".to_string(), vec!["alice".to_string()])].into(),
            rules: vec![PolicyRule {
                identities: vec!["group:dev".into()],
                targets: vec!["db".into()],
            }],
        });
        assert!(p.allows("alice", "db"));
        assert!(!p.allows("alice", "web"));
        assert!(!p.allows("mallory", "db"));
        assert!(p.allows("root", "anything"));
        assert!(!Policy::default().allows("alice", "db"));
    }
}
