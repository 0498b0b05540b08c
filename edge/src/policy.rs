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

    /// May `identity` read every captured session (admins and auditors)?
    pub fn reads_all(&self, identity: &str) -> bool {
        self.is_admin(identity) || self.cfg.auditors.iter().any(|a| self.names(identity, a))
    }

    /// The targets whose captured sessions `identity` may read: those its rules let
    /// it reach; `None` when a rule names every target (`*`).
    pub fn readable_targets(&self, identity: &str) -> Option<Vec<String>> {
        let mut out = Vec::new();
        for r in &self.cfg.rules {
            if !r.identities.iter().any(|p| self.names(identity, p)) {
                continue;
            }
            for t in &r.targets {
                if t == "*" {
                    return None;
                }
                if !out.contains(t) {
                    out.push(t.clone());
                }
            }
        }
        Some(out)
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
            auditors: vec![],
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
        assert_eq!(p.readable_targets("alice"), Some(vec!["db".to_string()]));
        assert_eq!(p.readable_targets("mallory"), Some(vec![]));
        assert!(p.reads_all("root") && !p.reads_all("alice"));
    }

    #[test]
    fn auditors_read_everything_and_wildcards_mean_every_target() {
        let p = Policy::new(PolicyConfig {
            auditors: vec!["group:sec".into()],
            groups: [("sec".to_string(), vec!["ines".to_string()])].into(),
            rules: vec![PolicyRule {
                identities: vec!["ops".into()],
                targets: vec!["web".into(), "*".into()],
            }],
            ..Default::default()
        });
        assert!(p.reads_all("ines"));
        assert!(!p.allows("ines", "web"), "reading is not reaching");
        assert_eq!(p.readable_targets("ops"), None);
    }
}
