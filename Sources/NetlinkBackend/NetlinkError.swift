/// Why talking to nf_tables failed, with the operation that failed in words.
public struct NetlinkError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: String, Sendable, Equatable {
        /// No CAP_NET_ADMIN in that network namespace (EPERM / EACCES). The CLI exits 77.
        case permissionDenied
        /// nf_tables, or the nat / conntrack modules, cannot be used (EAFNOSUPPORT, EPROTONOSUPPORT, or
        /// ENOENT while creating a nat chain or a nat / masquerade expression).
        case unavailable
        /// The kernel refused an operation of the batch; nothing was committed.
        case rejected
        /// The plan cannot be expressed as an nftables table (e.g. the kube-proxy target).
        case unsupportedPlan
        /// `table inet <name>` exists but is not ours (no `comment "managed by hostnet-dnat"`): apply and remove
        /// refuse to replace or delete it, and send nothing. The CLI exits 64 (choose another --table).
        case foreignTable
        /// Opening or entering the network namespace failed.
        case namespace
        /// A socket call failed, or the kernel's answer could not be understood.
        case io
    }

    public let kind: Kind
    /// The failing operation in words, e.g. "adding element 203.0.113.10 . tcp . 443 : goto … to map dispatch4".
    public let operation: String?
    /// The errno the kernel (or a system call) returned, 0 when there is none.
    public let errno: Int32
    /// strerror text plus the kernel's extended ack message when it sent one.
    public let message: String
    /// Further failing operations of the same batch (the kernel reports every error of a batch).
    public let otherFailures: [String]

    public init(kind: Kind, operation: String?, errno: Int32, message: String, otherFailures: [String] = []) {
        self.kind = kind; self.operation = operation; self.errno = errno; self.message = message
        self.otherFailures = otherFailures
    }

    public var isPermissionDenied: Bool { kind == .permissionDenied }
    public var isUnavailable: Bool { kind == .unavailable }
    /// The kernel refused an incremental `update` because the table is not what the update started from:
    /// an element to delete is missing (ENOENT; also a missing table or map), an element or chain to add
    /// already exists (EEXIST), or a chain to delete is still used (EBUSY): someone changed the table. Nothing
    /// was committed; apply the new plan in full. (Any other `.rejected` error of `update` calls for the same.)
    public var isOutOfSync: Bool { kind == .rejected && (errno == 2 || errno == 17 || errno == 16) }

    public static let unavailableHint = "nf_tables or nat modules unavailable (nf_tables, nft_nat, nft_chain_nat, nf_conntrack)"

    public var description: String {
        var s: String
        switch kind {
        case .unsupportedPlan, .foreignTable:
            s = message
        case .unavailable:
            s = NetlinkError.unavailableHint
            if let op = operation { s += ": \(op)" }
            s += ": \(message)"
        case .permissionDenied:
            s = "permission denied (CAP_NET_ADMIN is needed in the target network namespace)"
            if let op = operation { s += " while \(op)" }
            s += ": \(message)"
        default:
            if let op = operation { s = "nftables rejected \(op): \(message)" } else { s = message }
        }
        if !otherFailures.isEmpty {
            s += "\n" + otherFailures.prefix(10).map { "  also: \($0)" }.joined(separator: "\n")
            if otherFailures.count > 10 { s += "\n  … and \(otherFailures.count - 10) more" }
        }
        return s
    }

    /// Names for the errno values this backend meets.
    static func errnoName(_ e: Int32) -> String {
        switch e {
        case 1: return "EPERM"
        case 2: return "ENOENT"
        case 5: return "EIO"
        case 7: return "E2BIG"
        case 9: return "EBADF"
        case 11: return "EAGAIN"
        case 12: return "ENOMEM"
        case 13: return "EACCES"
        case 16: return "EBUSY"
        case 17: return "EEXIST"
        case 22: return "EINVAL"
        case 28: return "ENOSPC"
        case 34: return "ERANGE"
        case 90: return "EMSGSIZE"
        case 93: return "EPROTONOSUPPORT"
        case 95: return "EOPNOTSUPP"
        case 97: return "EAFNOSUPPORT"
        case 105: return "ENOBUFS"
        case 110: return "ETIMEDOUT"
        default: return "errno \(e)"
        }
    }

    /// Classifies a kernel error for an operation.
    static func kind(errno e: Int32, operation: NftOperation?) -> Kind {
        switch e {
        case 1, 13: return .permissionDenied
        case 97, 93: return .unavailable
        case 2:
            // ENOENT for a nat chain type or a nat/masq expression means the modules are missing.
            guard let op = operation else { return .rejected }
            switch op.kind {
            case .newChain(let c) where c.base?.type == "nat": return .unavailable
            case .newRule(let r) where r.expressions.contains(where: { $0.name == "nat" || $0.name == "masq" || $0.name == "ct" }):
                // Unless it looks up a set the batch does not create (no set id: an affinity set that an
                // update keeps): then that set is what is missing.
                let existingSet = r.expressions.contains { e in
                    switch e {
                    case .lookup(_, nil, _, _, _), .dynset(_, _, _, nil): return true
                    default: return false
                    }
                }
                return existingSet ? .rejected : .unavailable
            default: return .rejected
            }
        default:
            return .rejected
        }
    }
}
