// The types tests/test_dashboards.py checks each dashboard against: Grafana's published schema
// (@grafana/schema), with each panel's options and field config checked against its own plugin's
// schema. The test writes every dashboard JSON as a TypeScript object literal into gen/ (so that
// unknown keys are errors too) and runs `tsc -p dashboards/schema`.
import type { AnnotationQuery, Dashboard, DataQuery, Panel, VariableModel } from '@grafana/schema';
import type * as BarGauge from '@grafana/schema/dist/esm/raw/composable/bargauge/panelcfg/x/BarGaugePanelCfg_types.gen';
import type * as PieChart from '@grafana/schema/dist/esm/raw/composable/piechart/panelcfg/x/PieChartPanelCfg_types.gen';
import type * as Stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as StateTimeline from '@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen';
import type * as Table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type * as TimeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

// JSON holds an enum's value ("absolute", 2), not the TypeScript enum member: map every enum to the
// union of its values, recursively; everything else is kept as the schema says.
// (A numeric enum accepts every number, so its values are read back from its text: `${T}`.)
type NumberOf<S> = S extends `${infer N extends number}` ? N : never;
export type Lit<T> =
  T extends string ? (string extends T ? string : `${T}`) :
  T extends number ? NumberOf<`${T}`> :
  T extends boolean ? T :
  T extends Array<infer U> ? Array<Lit<U>> :
  T extends object ? { [K in keyof T]: Lit<T[K]> } : T;

// The Prometheus data source's query fields (its query type is not in @grafana/schema).
export interface PromQuery extends Lit<DataQuery> {
  expr: string;
  legendFormat?: string;
  instant?: boolean;
  range?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  interval?: string;
}

// The Prometheus data source's annotation fields (kept beside the generic ones, as Grafana saves them).
export interface PromAnnotation extends Lit<AnnotationQuery> {
  expr: string;
  step?: string;
  titleFormat?: string;
  textFormat?: string;
  tagKeys?: string;
  useValueForTime?: boolean;
}

type BasePanel = Omit<Lit<Panel>, 'options' | 'fieldConfig' | 'targets' | 'type'>;
type Typed<K extends string, O, F> = BasePanel & {
  type: K;
  targets: PromQuery[];
  options: Partial<Lit<O>>;
  fieldConfig: Omit<Lit<NonNullable<Panel['fieldConfig']>>, 'defaults'> & {
    defaults: Omit<Lit<NonNullable<Panel['fieldConfig']>['defaults']>, 'custom'> & { custom?: Partial<Lit<F>> };
  };
};
export type StatPanel = Typed<'stat', Stat.Options, {}>;
export type TimeSeriesPanel = Typed<'timeseries', TimeSeries.Options, TimeSeries.FieldConfig>;
export type TablePanel = Typed<'table', Table.Options, Table.FieldConfig>;
export type PieChartPanel = Typed<'piechart', PieChart.Options, PieChart.FieldConfig>;
export type BarGaugePanel = Typed<'bargauge', BarGauge.Options, {}>;
export type StateTimelinePanel = Typed<'state-timeline', StateTimeline.Options, StateTimeline.FieldConfig>;
export type AnyPanel = StatPanel | TimeSeriesPanel | TablePanel | PieChartPanel | BarGaugePanel | StateTimelinePanel;

export type StragglerDashboard = Omit<Lit<Dashboard>, 'panels' | 'annotations' | 'templating'> & {
  panels: AnyPanel[];
  annotations: { list: PromAnnotation[] };
  templating: { list: Lit<VariableModel>[] };
};
