import CoreMetrics
import Foundation
import NIOConcurrencyHelpers
import Prometheus
#if canImport(Glibc)
import Glibc
#endif

/// The standard `process_*` metrics (the names client_golang's process collector uses, so existing
/// dashboards work), read from /proc/self at each scrape. swift-prometheus 2.4 has no process collector,
/// so these few are read here and recorded through the same swift-metrics factory.
final class ProcessMetrics: Sendable {
    private let residentMemory: CoreMetrics.Gauge
    private let virtualMemory: CoreMetrics.Gauge
    private let startTime: CoreMetrics.Gauge
    private let openFDs: CoreMetrics.Gauge
    private let maxFDs: CoreMetrics.Gauge
    /// A counter in Prometheus terms; fed with the growth since the last scrape.
    private let cpuSeconds: CoreMetrics.FloatingPointCounter
    private let lastCPUSeconds = NIOLockedValueBox(0.0)

    init(factory: PrometheusMetricsFactory) {
        residentMemory = CoreMetrics.Gauge(label: "process_resident_memory_bytes", factory: factory)
        virtualMemory = CoreMetrics.Gauge(label: "process_virtual_memory_bytes", factory: factory)
        startTime = CoreMetrics.Gauge(label: "process_start_time_seconds", factory: factory)
        openFDs = CoreMetrics.Gauge(label: "process_open_fds", factory: factory)
        maxFDs = CoreMetrics.Gauge(label: "process_max_fds", factory: factory)
        cpuSeconds = CoreMetrics.FloatingPointCounter(label: "process_cpu_seconds_total", factory: factory)
        refresh()
    }

    /// What /proc/self/stat says, in the units the metrics use.
    struct Stat: Equatable {
        var cpuSeconds: Double
        var startTimeSeconds: Double
        var virtualBytes: Double
        var residentBytes: Double
    }

    /// Parses /proc/self/stat. Fields are counted after the last `)`, because the command name (field 2) may
    /// itself contain spaces and parentheses. See proc(5): utime 14, stime 15, starttime 22, vsize 23, rss 24.
    static func parseStat(_ text: String, clockTicks: Double, pageSize: Double, bootTime: Double) -> Stat? {
        guard let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ", omittingEmptySubsequences: true)
        // fields[0] is field 3 (state).
        func field(_ n: Int) -> Double? { n - 3 < fields.count ? Double(fields[n - 3]) : nil }
        guard let utime = field(14), let stime = field(15), let start = field(22), let vsize = field(23),
              let rss = field(24), clockTicks > 0 else { return nil }
        return Stat(cpuSeconds: (utime + stime) / clockTicks, startTimeSeconds: bootTime + start / clockTicks,
                    virtualBytes: vsize, residentBytes: rss * pageSize)
    }

    /// `btime` from /proc/stat: the boot time in seconds since the epoch.
    static func parseBootTime(_ text: String) -> Double? {
        for line in text.split(separator: "\n") where line.hasPrefix("btime ") {
            return Double(line.dropFirst(6).trimmingCharacters(in: .whitespaces))
        }
        return nil
    }

    /// The soft limit on open files from /proc/self/limits (`Max open files  1024  524288  files`).
    static func parseMaxFDs(_ text: String) -> Double? {
        for line in text.split(separator: "\n") where line.hasPrefix("Max open files") {
            let rest = line.dropFirst("Max open files".count).split(separator: " ", omittingEmptySubsequences: true)
            return rest.first.flatMap { Double($0) }
        }
        return nil
    }

    func refresh() {
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        let page = Double(sysconf(Int32(_SC_PAGESIZE)))
        let boot = (try? String(contentsOfFile: "/proc/stat", encoding: .utf8)).flatMap(Self.parseBootTime) ?? 0
        if let text = try? String(contentsOfFile: "/proc/self/stat", encoding: .utf8),
           let stat = Self.parseStat(text, clockTicks: ticks, pageSize: page, bootTime: boot) {
            residentMemory.record(stat.residentBytes)
            virtualMemory.record(stat.virtualBytes)
            startTime.record(stat.startTimeSeconds)
            let delta = lastCPUSeconds.withLockedValue { last -> Double in
                let d = max(0, stat.cpuSeconds - last)
                last = max(last, stat.cpuSeconds)
                return d
            }
            if delta > 0 { cpuSeconds.increment(by: delta) }
        }
        if let fds = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd") {
            openFDs.record(fds.count)
        }
        if let max = (try? String(contentsOfFile: "/proc/self/limits", encoding: .utf8)).flatMap(Self.parseMaxFDs) {
            maxFDs.record(max)
        }
    }
}
