import NetAddress

/// Why operating the agent cannot start: a value the CLI maps to a sysexits code, with a sentence for the user.
public enum AgentOperationsError: Error, Sendable, Equatable, CustomStringConvertible {
    /// A malformed flag value (exit 64).
    case usage(String)
    /// Something needed is not available: the address cannot be bound, the port is taken (exit 69).
    case unavailable(String)

    /// The sysexits code: 64 (EX_USAGE) or 69 (EX_UNAVAILABLE).
    public var exitCode: Int32 {
        switch self {
        case .usage: 64
        case .unavailable: 69
        }
    }

    public var description: String {
        switch self {
        case .usage(let message), .unavailable(let message): message
        }
    }
}

/// Where one of the agent's HTTP listeners binds: `--metrics-bind-address` / `--healthz-bind-address`.
///
/// The accepted forms are kube-proxy's: `IPv4:PORT`, `[IPv6]:PORT`, and `0` to turn the listener off. A
/// host name is refused rather than resolved: a node agent that binds whatever DNS says at start-up could
/// expose its endpoints on an address nobody chose.
public struct ListenAddress: Sendable, Hashable, CustomStringConvertible {
    /// An IP literal without brackets, e.g. `127.0.0.1` or `::`.
    public let host: String
    /// 0 asks the kernel for a free port (tests); `boundPort` on the server says which.
    public let port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// `127.0.0.1:10269`, `[::1]:10269`.
    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

    /// The default for `--metrics-bind-address`: loopback only, as kube-proxy's metrics.
    public static let defaultMetrics = ListenAddress(host: "127.0.0.1", port: 10269)
    /// The default for `--healthz-bind-address`: every address, so the kubelet's probes reach it.
    public static let defaultHealthz = ListenAddress(host: "0.0.0.0", port: 10270)

    /// Parses a flag value. Returns nil for `0` (the listener is disabled).
    /// - Parameter flag: the flag's name for the error message, e.g. `--metrics-bind-address`.
    public static func parse(_ text: String, flag: String) throws(AgentOperationsError) -> ListenAddress? {
        if text == "0" { return nil }
        func bad(_ why: String) -> AgentOperationsError {
            .usage("\(flag) \(text.debugDescription): \(why); expected IPv4:PORT, [IPv6]:PORT or 0 to disable")
        }
        let host: Substring, portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { throw bad("missing ] after the IPv6 address") }
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { throw bad("missing :PORT after the IPv6 address") }
            portText = rest.dropFirst()
            guard let ip = IPAddress(host), ip.family == .ipv6 else { throw bad("\(String(host).debugDescription) is not an IPv6 address") }
        } else {
            guard let colon = text.lastIndex(of: ":") else { throw bad("missing :PORT") }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
            if host.contains(":") { throw bad("an IPv6 address needs brackets, as in [::1]:10269") }
            guard let ip = IPAddress(host), ip.family == .ipv4 else {
                throw bad(host.isEmpty ? "missing the address before :PORT (use 0.0.0.0 for every address)"
                                       : "\(String(host).debugDescription) is not an IP address (host names are not resolved)")
            }
        }
        guard !portText.isEmpty, portText.count <= 5, portText.allSatisfy({ $0.isASCII && $0.isNumber }),
              let port = Int(portText), port <= 65535 else {
            throw bad("the port must be a number from 0 to 65535")
        }
        return ListenAddress(host: String(host), port: port)
    }
}
