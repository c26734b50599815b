/// The address family of an IP address, as Kubernetes names it (`spec.ipFamilies`).
public enum IPFamily: String, Sendable, Hashable, Comparable, CaseIterable, Codable {
    case ipv4 = "IPv4"
    case ipv6 = "IPv6"

    public static func < (a: IPFamily, b: IPFamily) -> Bool { a == .ipv4 && b == .ipv6 }

    /// The nft keyword for this family inside an `inet` table (`ip` / `ip6`).
    public var nftKeyword: String { self == .ipv4 ? "ip" : "ip6" }
    /// Address width in bits.
    public var bitWidth: Int { self == .ipv4 ? 32 : 128 }
}

/// An IPv4 or IPv6 address, kept as 128 bits so that comparison and hashing are cheap and
/// output ordering is numeric (IPv4 before IPv6), which makes every rendered file deterministic.
public struct IPAddress: Sendable, Hashable, Comparable, CustomStringConvertible {
    public let family: IPFamily
    /// High and low 64 bits, network order. IPv4 uses the low 32 bits of `low`.
    public let high: UInt64
    public let low: UInt64

    public init(ipv4 value: UInt32) {
        family = .ipv4; high = 0; low = UInt64(value)
    }

    public init(ipv6 high: UInt64, _ low: UInt64) {
        family = .ipv6; self.high = high; self.low = low
    }

    /// The address as bytes in network order (4 or 16 of them).
    public var bytes: [UInt8] {
        switch family {
        case .ipv4:
            let v = UInt32(truncatingIfNeeded: low)
            return [UInt8(v >> 24), UInt8(v >> 16 & 0xff), UInt8(v >> 8 & 0xff), UInt8(v & 0xff)]
        case .ipv6:
            var out = [UInt8](repeating: 0, count: 16)
            for i in 0..<8 {
                out[i] = UInt8(truncatingIfNeeded: high >> (56 - 8 * UInt64(i)))
                out[8 + i] = UInt8(truncatingIfNeeded: low >> (56 - 8 * UInt64(i)))
            }
            return out
        }
    }

    public init?(bytes: [UInt8]) {
        if bytes.count == 4 {
            self.init(ipv4: bytes.reduce(0) { $0 << 8 | UInt32($1) })
        } else if bytes.count == 16 {
            let h = bytes[0..<8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            let l = bytes[8..<16].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            self.init(ipv6: h, l)
        } else {
            return nil
        }
    }

    /// Parses a textual address strictly: dotted quad without leading zeros (as Kubernetes' validation
    /// does), or any RFC 4291 IPv6 form, including an embedded IPv4 tail. No zones, no brackets.
    public init?(_ text: some StringProtocol) {
        let utf8 = Array(text.utf8)
        if utf8.contains(UInt8(ascii: ":")) {
            guard let v = IPAddress.parseIPv6(utf8) else { return nil }
            self = v
        } else {
            guard let v = IPAddress.parseIPv4(utf8[...]) else { return nil }
            self.init(ipv4: v)
        }
    }

    static func parseIPv4(_ s: ArraySlice<UInt8>) -> UInt32? {
        var value: UInt32 = 0
        var octets = 0
        var current: UInt32 = 0
        var digits = 0
        var leadingZero = false
        for c in s {
            if c >= 48 && c <= 57 {
                if digits == 1 && leadingZero { return nil }
                if digits == 0 { leadingZero = c == 48 }
                current = current * 10 + UInt32(c - 48)
                digits += 1
                if digits > 3 || current > 255 { return nil }
            } else if c == UInt8(ascii: ".") {
                guard digits > 0, octets < 3 else { return nil }
                value = value << 8 | current
                octets += 1; current = 0; digits = 0
            } else {
                return nil
            }
        }
        guard digits > 0, octets == 3 else { return nil }
        return value << 8 | current
    }

    static func parseIPv6(_ s: [UInt8]) -> IPAddress? {
        if s.count < 2 || s.count > 45 { return nil }
        var groups: [UInt16] = []
        var gapIndex: Int? = nil
        var i = 0
        if s[0] == UInt8(ascii: ":") {
            guard s[1] == UInt8(ascii: ":") else { return nil }
            gapIndex = 0
            i = 2
            if i == s.count { return IPAddress(ipv6: 0, 0) }
        }
        while i < s.count {
            // Read one group, or an IPv4 tail.
            var j = i
            var value: UInt32 = 0
            while j < s.count, let h = hexValue(s[j]) {
                value = value << 4 | UInt32(h)
                j += 1
                if j - i > 4 { break }
            }
            if j < s.count && s[j] == UInt8(ascii: ".") {
                guard groups.count <= 6, let v4 = parseIPv4(s[i...]) else { return nil }
                groups.append(UInt16(v4 >> 16)); groups.append(UInt16(v4 & 0xffff))
                i = s.count
                break
            }
            let len = j - i
            guard len >= 1, len <= 4 else { return nil }
            groups.append(UInt16(value))
            i = j
            if i == s.count { break }
            guard s[i] == UInt8(ascii: ":") else { return nil }
            i += 1
            if i < s.count && s[i] == UInt8(ascii: ":") {
                guard gapIndex == nil else { return nil }
                gapIndex = groups.count
                i += 1
                if i == s.count { break }
            } else if i == s.count {
                return nil
            }
        }
        if let gap = gapIndex {
            guard groups.count <= 7 else { return nil }
            groups.insert(contentsOf: [UInt16](repeating: 0, count: 8 - groups.count), at: gap)
        }
        guard groups.count == 8 else { return nil }
        let h = groups[0..<4].reduce(UInt64(0)) { $0 << 16 | UInt64($1) }
        let l = groups[4..<8].reduce(UInt64(0)) { $0 << 16 | UInt64($1) }
        return IPAddress(ipv6: h, l)
    }

    private static func hexValue(_ c: UInt8) -> UInt8? {
        switch c {
        case 48...57: return c - 48
        case 97...102: return c - 87
        case 65...70: return c - 55
        default: return nil
        }
    }

    /// Canonical text: dotted quad, or RFC 5952 for IPv6 (lowercase, longest zero run compressed).
    public var description: String {
        switch family {
        case .ipv4:
            // Four small integers joined: at most 15 bytes, so the string never leaves the stack.
            let v = UInt32(truncatingIfNeeded: low)
            return String(v >> 24) + "." + String(v >> 16 & 0xff) + "." + String(v >> 8 & 0xff) + "." + String(v & 0xff)
        case .ipv6:
            var groups = [UInt16](repeating: 0, count: 8)
            for k in 0..<4 {
                groups[k] = UInt16(truncatingIfNeeded: high >> (48 - 16 * UInt64(k)))
                groups[4 + k] = UInt16(truncatingIfNeeded: low >> (48 - 16 * UInt64(k)))
            }
            var bestStart = -1, bestLen = 0, curStart = -1, curLen = 0
            for k in 0..<8 {
                if groups[k] == 0 {
                    if curStart < 0 { curStart = k; curLen = 0 }
                    curLen += 1
                    if curLen > bestLen { bestStart = curStart; bestLen = curLen }
                } else {
                    curStart = -1
                }
            }
            if bestLen < 2 { bestStart = -1 }
            var out = ""
            var k = 0
            while k < 8 {
                if k == bestStart {
                    out += "::"
                    k += bestLen
                    continue
                }
                if !out.isEmpty && !out.hasSuffix(":") { out += ":" }
                out += String(groups[k], radix: 16)
                k += 1
            }
            return out
        }
    }

    /// The form used where a port follows: `[2001:db8::1]` for IPv6.
    public var bracketed: String { family == .ipv6 ? "[\(description)]" : description }

    public static func < (a: IPAddress, b: IPAddress) -> Bool {
        if a.family != b.family { return a.family < b.family }
        if a.high != b.high { return a.high < b.high }
        return a.low < b.low
    }
}

/// A CIDR block such as `203.0.113.0/24`; used for the `spec.externalIPs` allowlist.
public struct CIDR: Sendable, Hashable, CustomStringConvertible {
    public let address: IPAddress
    public let prefixLength: Int

    public init?(_ text: some StringProtocol) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let ip = IPAddress(parts[0]), let len = Int(parts[1]),
              !parts[1].hasPrefix("+"), len >= 0, len <= ip.family.bitWidth else { return nil }
        // Normalise host bits away so `203.0.113.7/24` means the network.
        address = CIDR.mask(ip, len)
        prefixLength = len
    }

    static func mask(_ ip: IPAddress, _ len: Int) -> IPAddress {
        switch ip.family {
        case .ipv4:
            let m: UInt32 = len == 0 ? 0 : ~UInt32(0) << UInt32(32 - len)
            return IPAddress(ipv4: UInt32(truncatingIfNeeded: ip.low) & m)
        case .ipv6:
            let hm: UInt64 = len >= 64 ? ~0 : (len == 0 ? 0 : ~UInt64(0) << UInt64(64 - len))
            let lm: UInt64 = len <= 64 ? 0 : ~UInt64(0) << UInt64(128 - len)
            return IPAddress(ipv6: ip.high & hm, ip.low & lm)
        }
    }

    public func contains(_ ip: IPAddress) -> Bool {
        ip.family == address.family && CIDR.mask(ip, prefixLength) == address
    }

    /// The block's last address (all host bits set): the end of the interval an nft set element covers.
    public var last: IPAddress {
        switch address.family {
        case .ipv4:
            let host: UInt32 = prefixLength == 0 ? ~0 : (prefixLength == 32 ? 0 : ~UInt32(0) >> UInt32(prefixLength))
            return IPAddress(ipv4: UInt32(truncatingIfNeeded: address.low) | host)
        case .ipv6:
            let hh: UInt64 = prefixLength >= 64 ? 0 : (prefixLength == 0 ? ~0 : ~UInt64(0) >> UInt64(prefixLength))
            let lh: UInt64 = prefixLength <= 64 ? ~0 : (prefixLength == 128 ? 0 : ~UInt64(0) >> UInt64(prefixLength - 64))
            return IPAddress(ipv6: address.high | hh, address.low | lh)
        }
    }

    /// The block from `first` to `last` when they delimit exactly one CIDR block (what an interval element
    /// read back from nft holds), else nil.
    public init?(first: IPAddress, last: IPAddress) {
        guard first.family == last.family else { return nil }
        for len in 0...first.family.bitWidth {
            guard let c = CIDR("\(first)/\(len)") else { return nil }
            if c.address == first && c.last == last { self = c; return }
        }
        return nil
    }

    public var description: String { "\(address)/\(prefixLength)" }
}

/// The transport protocols a Service port can carry.
public enum TransportProtocol: String, Sendable, Hashable, Comparable, CaseIterable, Codable {
    case tcp = "TCP"
    case udp = "UDP"
    case sctp = "SCTP"

    /// IANA protocol number, as `meta l4proto` compares it.
    public var number: UInt8 {
        switch self {
        case .tcp: return 6
        case .udp: return 17
        case .sctp: return 132
        }
    }

    /// Lowercase name, as nft and iptables spell it.
    public var lowercased: String {
        // Literals, not `rawValue.lowercased()`: renderers ask once per rule (tens of thousands of times).
        switch self {
        case .tcp: return "tcp"
        case .udp: return "udp"
        case .sctp: return "sctp"
        }
    }

    public static func < (a: TransportProtocol, b: TransportProtocol) -> Bool { a.number < b.number }
}
