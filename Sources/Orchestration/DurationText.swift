/// Durations written the way kube-proxy's flags take them (Go's `time.ParseDuration`): a sequence of
/// decimal numbers, each with a unit, such as `250ms`, `1s`, `1.5s`, `5m`, `1h30m`. `0` alone is zero.
public enum DurationText {
    public static func parse(_ text: String) -> Duration? {
        let s = Array(text.utf8)
        if s == Array("0".utf8) { return .zero }
        guard !s.isEmpty else { return nil }
        var i = 0
        var total: Double = 0
        while i < s.count {
            let start = i
            while i < s.count, (s[i] >= UInt8(ascii: "0") && s[i] <= UInt8(ascii: "9")) || s[i] == UInt8(ascii: ".") { i += 1 }
            guard i > start, let value = Double(String(decoding: s[start..<i], as: UTF8.self)) else { return nil }
            let unitStart = i
            while i < s.count, !(s[i] >= UInt8(ascii: "0") && s[i] <= UInt8(ascii: "9")), s[i] != UInt8(ascii: ".") { i += 1 }
            let unit = String(decoding: s[unitStart..<i], as: UTF8.self)
            let scale: Double
            switch unit {
            case "ns": scale = 1e-9
            case "us", "µs": scale = 1e-6
            case "ms": scale = 1e-3
            case "s": scale = 1
            case "m": scale = 60
            case "h": scale = 3600
            default: return nil
            }
            total += value * scale
        }
        guard total.isFinite, total < 1e9 else { return nil }
        return .nanoseconds(Int64((total * 1e9).rounded()))
    }

    /// `1.5s`, `250ms`, `5m0s`-style text for messages.
    public static func format(_ d: Duration) -> String {
        let ms = Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
        if ms < 1000 { return "\(Int(ms.rounded()))ms" }
        if ms < 60_000 { return "\((ms / 1000 * 10).rounded() / 10)s" }
        return "\(Int(ms / 60_000))m\(Int(ms / 1000) % 60)s"
    }
}
